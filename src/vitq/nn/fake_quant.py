"""FakeQuant: one quantization site (spec + observer + parameters held as buffers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from ..errors import CalibrationError
from ..granularity import PerChannel, PerTensor, PerToken
from ..observers import Observer, weight_params
from ..quantizers.base import Params, QuantSpec, fake_quant, get_quantizer
from ..roles import Role


class FakeQuant(nn.Module):
    """Simulated quantization of one tensor: ``x -> dequantize(quantize(x))``.

    States, all explicit (see :func:`vitq.nn.calibrate` / :func:`vitq.nn.disabled`):

    * ``enabled`` False: identity;
    * ``calibrating`` True: identity, and the observer records ``x``;
    * otherwise: fake-quantize with the parameters in the buffers. A site that was never
      calibrated raises instead of guessing ("no lazy initialise on first forward").

    Per-token specs are dynamic: their parameters come from each input's own min / max.
    """

    if TYPE_CHECKING:  # the quantizer's parameters are buffers registered by name (scale, zero_point, ...)
        def __getattr__(self, name: str) -> Tensor: ...

    initialized: Tensor

    def __init__(self, spec: QuantSpec, role: Role, site: str = "", kind: str = "act") -> None:
        super().__init__()
        self.spec = spec
        self.role = role
        self.site = site
        self.kind = kind  # "act" | "weight"
        self.enabled = True
        self.calibrating = False
        #: sequential calibration: the first input seen sets the parameters and is already quantized
        self.calibrate_once = False
        self.observer: Optional[Observer] = None
        self.quantizer = get_quantizer(spec.quantizer)
        self.register_buffer("initialized", torch.tensor(False))
        #: Python mirror of ``initialized``: the forward reads this, never the tensor, so a calibrated
        #: model has no data-dependent branch (``torch.export`` traces it)
        self.ready = False
        for name in self.quantizer.param_names:
            self.register_buffer(name, torch.empty(0))

    # -- parameters -------------------------------------------------------------------------
    @property
    def params(self) -> Params:
        return {n: getattr(self, n) for n in self.quantizer.param_names}

    def set_params(self, p: Params) -> None:
        for n in self.quantizer.param_names:
            setattr(self, n, p[n].detach().clone().float())
        self._mark_initialized()

    def _mark_initialized(self) -> None:
        self.initialized = torch.tensor(True, device=self.initialized.device)
        self.ready = True

    def adopt_shapes(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Parameter shapes are only known after calibration: take the stored ones before loading. A channel-wise
        site stored with one scalar scale was made per-tensor after calibration (RepQ-ViT / MOSF fold the channel
        factors into the LayerNorm): its spec says so again, so what reads the spec (the export's lowering: a
        per-tensor site is an integer QDQ, a channel-wise one float emulation) sees the model that was saved."""
        for n in (*self.quantizer.param_names, "initialized"):
            key = prefix + n
            if key in state_dict:
                setattr(self, n, torch.empty_like(state_dict[key]))
        scale = state_dict.get(prefix + "scale")
        if isinstance(self.spec.granularity, PerChannel) and isinstance(scale, Tensor) and scale.dim() == 0:
            self.spec = self.spec.with_(granularity=PerTensor())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self.adopt_shapes(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.ready = bool(self.initialized)  # loading is not tracing: read the tensor here, once

    # -- calibration ------------------------------------------------------------------------
    def start_calibration(self, max_elements: Optional[int] = None, seed: int = 0, plan: Any = None,
                          once: bool = False) -> None:
        """``once``: the first input seen sets the parameters and leaves the site quantized (what flows
        downstream is then the quantized value: sequential calibration)."""
        kw = {} if max_elements is None else {"max_elements": max_elements}
        self.observer = Observer(self.spec, self.site, seed=seed, plan=plan, **kw)
        self.calibrating = True
        self.calibrate_once = once

    def finish_calibration(self) -> None:
        self.calibrating = False
        self.calibrate_once = False
        if self.observer is None:
            return
        if not self.spec.dynamic:
            self.set_params(self.observer.compute())
        else:
            self._mark_initialized()
        self.observer = None

    def calibrate_weight(self, w: Tensor) -> None:
        if self.spec.dynamic:
            self._mark_initialized()
            return
        self.set_params(weight_params(w.detach(), self.spec, self.site))

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            assert self.observer is not None
            self.observer.observe(x)
            if not self.calibrate_once:
                return x
            self.finish_calibration()
        if isinstance(self.spec.granularity, PerToken):
            return fake_quant(x, self._dynamic_params(x), self.spec)
        if not self.ready:
            raise CalibrationError(
                f"quantization site {self.site} ({self.role}) has no parameters: calibrate the model "
                "(vitq.calibrate / run_recipe) before running it quantized"
            )
        return fake_quant(x, self.params, self.spec)

    def _dynamic_params(self, x: Tensor) -> Params:
        xd = x.detach()
        return self.quantizer.init_params(xd.amin(-1, keepdim=True), xd.amax(-1, keepdim=True), self.spec)

    def extra_repr(self) -> str:
        return f"{self.site}: {self.role} {self.kind} {self.spec.describe()}"

    def manifest_entry(self) -> dict[str, Any]:
        return {"site": self.site, "role": str(self.role), "kind": self.kind, **self.spec.to_dict(),
                "calibrated": self.ready}
