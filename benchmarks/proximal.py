"""A proximal outer loop for ELEGANT's drift (a measurement of ``benchmarks/elegant_objective.py --proximal``).

Mirror descent on the path law: outer step ``n`` maximises ``J(P) - beta KL(P || P_n)`` over the control, with
``P_n`` the control frozen at the start of the step. Its exact maximiser is

    P_{n+1}  ∝  P_pre^(alpha / (alpha + beta))  P_n^(beta / (alpha + beta))  exp(r / (alpha + beta)),

so ``log P_{n+1} - log P*`` is ``beta / (alpha + beta)`` times ``log P_n - log P*``: exactly solved, the outer
iterates contract geometrically toward the tilted law ``P*``. Each outer step here is ``every`` pathwise iterations
of the same optimiser (its moments kept), with the KL to ``P_n`` added through the sampler's reference adapter --
the term SEIKO's ``beta`` already adds (``hf_control_ft/trainers/seiko.py``). The reference chain costs one more
forward pass of the network per sampling step of each rollout.
"""

from __future__ import annotations

from hf_control_ft.core.control import CONTROL_ADAPTER, add_reference_adapter, copy_adapter_weights

ANCHOR = "proximal_anchor"


def attach_proximal(trainer, beta: float, every: int):
    """Adds the frozen anchor adapter and the ``beta`` KL to it to ``trainer``'s pathwise drift; returns
    ``refresh(step)``, which moves the anchor to the current control every ``every`` iterations."""
    if trainer.config.drift_objective != "pathwise":
        raise SystemExit("--proximal: the KL to the anchor is added to the pathwise gradient only "
                         "(--elegant drift_objective=pathwise)")
    add_reference_adapter(trainer.process.lora_model, ANCHOR, source=CONTROL_ADAPTER)
    trainer.sampler = trainer.process.make_sampler(reference_adapter=ANCHOR)
    iterate = trainer.drift_iteration

    def drift_iteration(optimizer, params, generator=None, reference_kl_weight=None, value_gradient=None):
        return iterate(optimizer, params, generator, reference_kl_weight=beta, value_gradient=value_gradient)

    trainer.drift_iteration = drift_iteration

    def refresh(step: int) -> None:
        if step % every == 0:
            copy_adapter_weights(trainer.process.lora_model, CONTROL_ADAPTER, ANCHOR)

    return refresh


__all__ = ["attach_proximal"]
