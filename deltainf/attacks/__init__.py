"""Poisoning attacks: BadNets patch, blended, WaNet warp, frequency (smooth) trigger, the clean-label SIG
and label-consistent backdoors, Witches' Brew (gradient matching).

Each attack returns a :class:`PoisonResult`: the poisoned training set, the ground-truth
``poison_indices``, the target class, a triggered test set and ``apply_trigger``.
"""
from deltainf.attacks.badnet import DIGITS_BADNET, PATCH_LOCATIONS, PATCH_PATTERNS, PatchTrigger, badnet_attack
from deltainf.attacks.base import PoisonResult, check_classes, resolve_poison_count, select_poison_indices
from deltainf.attacks.blended import DIGITS_BLENDED, BlendTrigger, blended_attack
from deltainf.attacks.clean_label import (DIGITS_LABEL_CONSISTENT, DIGITS_SIG, CornerTrigger, SinusoidTrigger,
                                          label_consistent_attack, pgd_away, sig_attack)
from deltainf.attacks.frequency import (DIGITS_FREQUENCY, SmoothTrigger, frequency_attack, gaussian_smooth,
                                        generate_smooth_trigger, targeted_deepfool)
from deltainf.attacks.wanet import DIGITS_WANET, WarpTrigger, wanet_attack
from deltainf.attacks.witches_brew import WitchesBrew, WitchesBrewResult, validate_brew, witches_brew_attack

__all__ = [
    "PoisonResult", "check_classes", "resolve_poison_count", "select_poison_indices",
    "PatchTrigger", "badnet_attack", "PATCH_PATTERNS", "PATCH_LOCATIONS",
    "SmoothTrigger", "frequency_attack", "generate_smooth_trigger", "targeted_deepfool",
    "gaussian_smooth", "DIGITS_BADNET", "DIGITS_FREQUENCY",
    "WitchesBrew", "WitchesBrewResult", "validate_brew", "witches_brew_attack",
    "BlendTrigger", "blended_attack", "DIGITS_BLENDED", "WarpTrigger", "wanet_attack", "DIGITS_WANET",
    "SinusoidTrigger", "sig_attack", "DIGITS_SIG", "CornerTrigger", "label_consistent_attack", "pgd_away",
    "DIGITS_LABEL_CONSISTENT",
]
