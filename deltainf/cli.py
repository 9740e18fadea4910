"""Command line: ``deltainf demo | detect | evaluate | bench``. Parses arguments, calls one story, and is
the one error boundary: every failure ends as one line on stderr and an exit status (see :func:`main`)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import traceback
import warnings


def _threshold(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be a number or 'auto', got {text!r}") from None


def _combine(text: str):
    if text in ("pooled", "any", "all", "majority"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"combine must be pooled, any, all, majority or an int, got {text!r}") from None


def _int_at_least(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}" if hi is None else
                                             f"expected an integer in [{lo}, {hi}], got {v}")
        return v
    return parse


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return v


def _add_delta_options(p: argparse.ArgumentParser) -> None:
    # scikit-learn's splits take seeds below 2**32
    p.add_argument("--seed", type=_int_at_least(0, 2 ** 32 - 1), default=0,
                   help="seed of everything random (default 0)")
    p.add_argument("--n-transforms", type=_int_at_least(1), default=None,
                   help="transformed copies per affected point (default 50)")
    p.add_argument("--threshold", type=_threshold, default=None, help="ΔInfl vote threshold, a number or 'auto'")
    p.add_argument("--fdr", type=_fraction, default=None,
                   help="false-discovery rate the calibrated cut may not exceed (default 0.2)")
    p.add_argument("--tolerance", type=_int_at_least(0), default=None,
                   help="use the paper's fixed rule instead of the calibrated cut: copies per affected point "
                        "allowed to miss the threshold")
    p.add_argument("--combine", type=_combine, default=None,
                   help="how several affected points combine: pooled (default), any, all, majority, or an int m")
    p.add_argument("--candidates", choices=("label", "all"), default=None,
                   help="which training examples can be flagged: those labelled with the adversarial label "
                        "(label, default) or any (all, for poisons that carry other labels)")
    p.add_argument("--boundary", choices=("representation", "mixture", "coherence"), default=None,
                   help="where a found group ends: also the candidates whose last-layer representation lies with "
                        "the group's (representation, default), the two-population fit of the candidates' support "
                        "(mixture), or the permutation cut (coherence: fewer false positives, lower recall; the "
                        "default for a model of two classes); the mirror cut's members are flagged with each")
    p.add_argument("--retrace", type=_int_at_least(0), default=None,
                   help="when a group is found from fewer affected inputs of a label than this, trace it again with "
                        "its most supportive members as further affected inputs, up to this many (default 10; 0: "
                        "never)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line like every other failure of the command line (argparse prints
    the whole usage first); ``-h`` still shows it."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} ({self.prog} -h shows the usage)\n")


def build_parser() -> argparse.ArgumentParser:
    from deltainf import evaluate, recipes, stories

    parser = _Parser(prog="deltainf", description="Find and remove poisoned training data with Δ-Influence.")
    debug_help = "on a failure, show the full traceback instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    from deltainf.version import __version__

    parser.add_argument("--version", action="version", version=f"deltainf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    talk = argparse.ArgumentParser(add_help=False)
    group = talk.add_mutually_exclusive_group()
    group.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    group.add_argument("--verbose", "-v", action="store_true", help="debug messages too")
    # accepted after the command too; SUPPRESS keeps a subcommand from resetting the value given before it
    talk.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)

    p = sub.add_parser("demo", parents=[talk], help="poison a dataset, detect the poisons, unlearn them, report")
    p.add_argument("--attack", default="badnet", choices=list(stories.ATTACKS))
    p.add_argument("--dataset", default="digits",
                   help="digits (bundled, default) | cifar10:PATH | cifar100:PATH | imagefolder:PATH | synthetic:N")
    p.add_argument("--out", default="out/demo", help="output folder (report.json, report.png, checkpoints)")
    p.add_argument("--image-size", type=_int_at_least(8), default=None,
                   help="image side in pixels (digits: 16; an image folder: the side its images share, which "
                        "images of several sizes need)")
    p.add_argument("--points", type=_int_at_least(1), default=None,
                   help="affected test points to trace: the first N triggered test inputs sent to the target "
                        "(default 10)")
    _add_delta_options(p)

    p = sub.add_parser("detect", parents=[talk], help="run Δ-Influence on your own model and data")
    p.add_argument("--model", default=None,
                   help="your architecture: package.module:factory (an importable callable returning the "
                        "nn.Module; weights from --checkpoint) or a torch.export file (.pt2); default: a "
                        "checkpoint written by deltainf")
    p.add_argument("--model-kwargs", default=None, help="keyword arguments for the factory, as a JSON object")
    p.add_argument("--checkpoint", default=None,
                   help="the model's weights: a safetensors state dict (not needed with a torch.export --model "
                        "file, whose weights it holds)")
    p.add_argument("--dataset", required=True,
                   help="training data spec, as for demo (its train split is scored, its test split gives the "
                        "controls); imagefolder:DIR reads DIR/train/<class>/ and DIR/val/<class>/")
    p.add_argument("--image-size", type=_int_at_least(8), default=None,
                   help="image side to load the data at (default: the size the model was made for where its "
                        "checkpoint or exported program records it, else the images' own size)")
    p.add_argument("--input-norm", default=None,
                   help="MEAN:STD (comma-separated per channel) when the model expects inputs standardised "
                        "with them; the data are pixel images in [0, 1]")
    p.add_argument("--affected", default=None,
                   help="tensor file (.pt/.safetensors/.npy) with the affected input(s): pixels in [0, 1] or "
                        "uint8, (C,H,W) or (P,C,H,W)")
    p.add_argument("--test-index", type=_int_at_least(0), nargs="+", default=None,
                   help="or: index (or indices) of the affected input(s) in the test split (val/ of an image "
                        "folder)")
    p.add_argument("--label", type=_int_at_least(0), default=None,
                   help="adversarial label, a class index (default: the model's prediction)")
    p.add_argument("--factors", default=None, help="reuse EK-FAC factors saved by an earlier run")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the content hash check of --checkpoint and --factors (for huge files; their "
                        "other checks stay)")
    p.add_argument("--out", default="out/detect",
                   help="run folder; rerunning an interrupted run with the same inputs resumes it")
    p.add_argument("--partition-size", type=_int_at_least(1), default=None,
                   help="examples per data partition of the EK-FAC passes: the unit of resuming and of the work "
                        "shared between torchrun ranks (default 4096)")
    _add_delta_options(p)

    p = sub.add_parser("evaluate", parents=[talk], help="compare detectors and unlearning methods across attacks and seeds")
    p.add_argument("--dataset", default="digits", help="the data, as for demo (default digits)")
    p.add_argument("--attacks", default="badnet,frequency,witches-brew",
                   help="comma-separated, from " + ", ".join(recipes.ATTACKS)
                        + " (default badnet,frequency,witches-brew)")
    p.add_argument("--detectors", default="all",
                   help="comma-separated, from " + ", ".join(evaluate.DETECTORS) + ", or all (default)")
    p.add_argument("--unlearn", default="exact,cf,ga,ssd,scrub,badt",
                   help="unlearning methods applied to Δ-Influence's flagged set, comma-separated, from "
                        + ", ".join(evaluate.UNLEARN_METHODS) + " (default all of them)")
    p.add_argument("--seeds", type=_int_at_least(1), default=3, help="seeds per attack (default 3)")
    p.add_argument("--out", default="out/evaluate", help="folder of the tables and per-run JSON (default out/evaluate)")
    p.add_argument("--image-size", type=_int_at_least(8), default=None,
                   help="image side in pixels, as for demo")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("bench", parents=[talk], help="benchmark the kernels on this machine")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    p.add_argument("--out", default=None, help="write the rows and machine info as JSON")
    return parser


# Failures of the input (a flag, a file, a dataset): exit status 2, like argparse's own errors. Anything
# else that goes wrong is a failure of the run: status 1.
_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, kill, torchrun's teardown), raised where the run is, so that it stops as at
    Ctrl-C: its folder marked interrupted, its temporary files gone (it ended with no word, the run marked
    running)."""


class _Sigterm:
    """The SIGTERM answer of the command this process runs. The handler's exception can be lost: raised inside
    code whose exceptions Python ignores (a weakref callback of the import system: "Exception ignored in ...") or
    that a library catches and drops, the run went on to its end with exit 0. So once the signal has come, it is
    sent again from outside such code, every half second, until the command has answered it."""

    def __init__(self) -> None:
        import threading

        self.thread = threading.main_thread().ident
        self.lock = threading.Lock()
        self.answered = False
        self.again = None

    def send_again_soon(self) -> None:
        import threading

        with self.lock:
            if self.answered:
                return
            if self.again is not None:
                self.again.cancel()
            self.again = threading.Timer(0.5, self._send_again)
            self.again.daemon = True
            self.again.start()

    def _send_again(self) -> None:
        import signal

        with self.lock:  # never after answer(): the handler may be the default one again by then
            if not self.answered:
                signal.pthread_kill(self.thread, signal.SIGTERM)

    def answer(self) -> None:
        # set before the lock is taken: the handler, running on this thread inside the lock, must not wait for it
        self.answered = True
        with self.lock:
            if self.again is not None:
                self.again.cancel()


_SIGTERM: _Sigterm | None = None


def _stopping(err: BaseException | None) -> bool:
    """Whether ``err``, the exception being handled, is a SIGTERM's or was raised while one was handled."""
    while err is not None:
        if isinstance(err, _Terminated):
            return True
        err = err.__context__
    return False


def _on_sigterm(signum, frame):
    state = _SIGTERM
    # the signal again while the run already stops for it (its cleanup running) or has answered it: let it finish
    if (state is not None and state.answered) or _stopping(sys.exc_info()[1]):
        return
    if state is not None:
        state.send_again_soon()
    raise _Terminated()


def _unshown_sigterm(unraisable, shown) -> None:
    """``sys.unraisablehook`` while a command runs: a SIGTERM exception that Python ignored is not printed (the
    signal comes again, see :class:`_Sigterm`); anything else is shown as before."""
    if not isinstance(unraisable.exc_value, _Terminated):
        shown(unraisable)


def main(argv=None) -> int:
    """Run one command; returns the exit status: 0 done, 1 a failure inside the run (or, for evaluate, a
    cell that failed), 2 bad input, 130 interrupted, 143 terminated (SIGTERM). Every failure is one line on
    stderr, or the full traceback with ``--debug``."""
    import signal
    import threading

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # known before parsing, which imports the package and may itself fail
    command = None
    # a single process only: under torchrun a rank blocked in a collective would run the handler only when the
    # collective returns, and torchrun's teardown (SIGTERM, then SIGKILL) would wait for it
    handles_sigterm = threading.current_thread() is threading.main_thread() and \
        os.environ.get("WORLD_SIZE", "1").strip() in ("", "1")
    global _SIGTERM
    previous, blocked, hook = None, False, sys.unraisablehook
    try:
        if handles_sigterm:  # inside the try: a SIGTERM right after the handler is in place is answered too
            _SIGTERM = _Sigterm()
            sys.unraisablehook = functools.partial(_unshown_sigterm, shown=hook)
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        # a parent that blocks SIGTERM (some job runners do) passes the blocked mask on: the handler would never run
        # (unblocked inside the try: a SIGTERM already pending arrives at once, and is this command's to answer)
        if handles_sigterm and hasattr(signal, "pthread_sigmask"):
            blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # known before it arrives
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        args = build_parser().parse_args(argv)
        command = args.command
        return _run(args)
    except KeyboardInterrupt as err:
        if _SIGTERM is not None:
            _SIGTERM.answer()
        if debug:
            traceback.print_exc()
        terminated = isinstance(err, _Terminated)
        print(f"{_prog(command)}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the one error boundary of the command line
        from deltainf._dist import reported_elsewhere
        from deltainf._util import first_line

        bad_input = isinstance(err, _BAD_INPUT)
        if reported_elsewhere(err):
            return EXIT_BAD_INPUT if bad_input else EXIT_FAILED
        if debug:
            traceback.print_exc()
        text = first_line(err) if bad_input else f"{type(err).__name__}: {first_line(err)}"
        hint = "" if bad_input or debug else " (--debug shows the traceback)"
        print(f"{_prog(command)}: error: {text}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILED
    finally:
        if _SIGTERM is not None:
            _SIGTERM.answer()
        if blocked:  # blocked again first: a SIGTERM from here on waits, as the parent meant, for what comes next
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            sys.unraisablehook = hook
            _SIGTERM = None


def _prog(command: str | None) -> str:
    return f"deltainf {command}" if command else "deltainf"


def _run(args: argparse.Namespace) -> int:
    from deltainf import _dist
    from deltainf._util import log_to_console

    if _dist._launched():  # a torchrun worker ends with its launcher from the start, not from its first pass on
        _dist._end_with_launcher()

    # under torchrun rank 0 reports; the other ranks only warn
    quiet = args.quiet or not _dist.is_main()
    log_to_console(logging.WARNING if quiet else logging.DEBUG if args.verbose else logging.INFO)
    shown = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        # a warning is a line of the command's output, not Python's two (its source file and code line)
        print(f"{_prog(args.command)}: warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = one_line
    try:
        return _command(args)
    finally:
        warnings.showwarning = shown
        _dist.shutdown()


def _command(args: argparse.Namespace) -> int:
    from deltainf import stories

    if args.command == "demo":
        stories.demo(attack=args.attack, dataset=args.dataset, out=args.out, seed=args.seed, points=args.points,
                     image_size=args.image_size,
                     n_transforms=args.n_transforms, threshold=args.threshold, tolerance=args.tolerance,
                     fdr=args.fdr, combine=args.combine, candidates=args.candidates,
                     boundary=args.boundary, retrace=args.retrace, progress=not args.no_progress)
    elif args.command == "detect":
        stories.detect(checkpoint=args.checkpoint, dataset=args.dataset, out=args.out, affected=args.affected,
                       test_index=args.test_index, label=args.label, factors=args.factors, seed=args.seed,
                       model=args.model, model_kwargs=args.model_kwargs, image_size=args.image_size,
                       input_norm=args.input_norm, n_transforms=args.n_transforms, threshold=args.threshold,
                       tolerance=args.tolerance, fdr=args.fdr, combine=args.combine,
                       candidates=args.candidates, boundary=args.boundary, retrace=args.retrace,
                       progress=not args.no_progress,
                       verify=not args.no_verify,
                       partition_size=args.partition_size)
    elif args.command == "evaluate":
        from deltainf import evaluate

        try:
            results = evaluate.run(dataset=args.dataset, attacks=args.attacks, detectors=args.detectors,
                                   unlearn=args.unlearn, seeds=args.seeds, out=args.out, image_size=args.image_size,
                                   progress=not args.no_progress)
        except ValueError as err:  # the settings' errors start with the parameters' names: the flags'
            names, _, text = str(err).partition(":")
            flags = [name.strip() for name in names.split(",")]
            if text and all(f in ("attacks", "detectors", "unlearn", "seeds", "dataset") for f in flags):
                raise ValueError(", ".join(f"--{f}" for f in flags) + ":" + text) from err
            raise
        failed = evaluate.failures(results)
        for line in failed:
            print(f"deltainf evaluate: {line}", file=sys.stderr)
        if failed:
            return EXIT_FAILED
    elif args.command == "bench":
        stories.bench(device=args.device, quick=args.quick, out=args.out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
