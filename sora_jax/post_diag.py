"""Post-Diag: the framework's cell ``T_pre = id``, ``T_post = diag(v)`` (docs/spec.md section 2's form).

``W' = (W + s A B) diag(v)``, ``b' = v * b`` (the bias goes through the diagonal, as it does in Pre-Diag;
only DoRA's normalised diagonal leaves it alone). DoRA without the normalisation: ``v: (d_out,)`` is trained
freely, initialised to ones, so ``W' = W`` at init (``B = 0``). Trainable per layer: ``r (d_in + d_out) + d_out``.
"""

from __future__ import annotations

from sora_jax.conditioning import IDENTITY, Method, diagonal

METHOD = Method("post_diag", IDENTITY, diagonal("v"))
