"""Synthetic apical 2CH/4CH echocardiography: a parametric heart (:mod:`.shapes`), scanner presets and the B-mode
rendering chain (:mod:`.vendors`), and whole labelled domains (:mod:`.domains`)."""
from rl_adapt.synth.domains import apply_vendor_shift, generate_domain, shifted_spacing

__all__ = ["apply_vendor_shift", "generate_domain", "shifted_spacing"]
