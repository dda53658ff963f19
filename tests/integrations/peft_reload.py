"""Load selora checkpoints in a fresh process through either front door (run by the tests).

Usage: ``python peft_reload.py REQUEST.pt REPORT.pt``. ``REQUEST.pt`` holds a
list of cases ``{"name", "kind", "seed", "path", "door", "inputs"}``: ``kind``
is a model of :data:`BUILDERS` (``"mlp"``, ``"llama"``, ``"gpt2"``, ...),
``door`` is ``"peft"`` (``PeftModel.from_pretrained``) or ``"native"``
(``selora.load_adapter``). The report holds, per case, the outputs of the
loaded model on ``inputs`` (or the error it raised), the loaded config and
the types of the loaded layers, and, first, what PEFT does with a selora
checkpoint before the bridge is imported.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from tiny_models import BUILDERS as HF_BUILDERS
from torch import Tensor, nn


class TinyMLP(nn.Module):
    """A three-layer MLP with named linear layers (even sizes: every wavelet basis fits)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyMLP().eval()


BUILDERS = {**HF_BUILDERS, "mlp": tiny_mlp}
MLP_TARGETS = ["lin0", "lin1", "head"]


def outputs(model: nn.Module, inputs: Tensor) -> Tensor:
    """The model's output on ``inputs`` (logits for a transformers model), without grad."""
    model.eval()
    with torch.no_grad():
        out = model(inputs) if inputs.is_floating_point() else model(input_ids=inputs).logits
    assert isinstance(out, Tensor)
    return out


def type_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _peft_load(case: dict[str, Any]) -> dict[str, Any]:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = PeftModel.from_pretrained(BUILDERS[case["kind"]](case["seed"]), case["path"])
    config = model.peft_config["default"]
    return {
        "outputs": outputs(model, case["inputs"]),
        "config_class": type_name(config),
        # peft_type is a str subclass; a plain str keeps the report weights_only-loadable
        "config": {**config.to_dict(), "peft_type": str(config.peft_type)},
        "peft_type_value": config.peft_type.value,
        "spectral": config.to_spectral_adapter().to_dict(),
        "layers": {
            name: type_name(module)
            for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)
        },
    }


def _native_load(case: dict[str, Any]) -> dict[str, Any]:
    import selora

    model = selora.load_adapter(BUILDERS[case["kind"]](case["seed"]), case["path"])
    return {
        "outputs": outputs(model, case["inputs"]),
        "spectral": selora.adapter_config(model).to_dict(),
        "layers": {name: type_name(layer) for name, layer in selora.adapter_layers(model)},
    }


def main() -> None:
    request: list[dict[str, Any]] = torch.load(sys.argv[1])
    torch.set_num_threads(1)
    report: dict[str, Any] = {}
    # Without the bridge, PEFT must refuse the checkpoint (never fall back to LoRA).
    assert "selora.integrations.peft" not in sys.modules
    first = next((c for c in request if c["door"] == "peft"), None)
    if first is not None:
        from peft import PeftModel

        try:
            PeftModel.from_pretrained(BUILDERS[first["kind"]](first["seed"]), first["path"])
            report["unregistered"] = "loaded"
        except Exception as exc:
            report["unregistered"] = f"{type(exc).__name__}: {exc}"
        import selora.integrations.peft  # noqa: F401 - registers the SELORA method

    for case in request:
        try:
            load = _peft_load if case["door"] == "peft" else _native_load
            report[case["name"]] = load(case)
        except Exception as exc:
            report[case["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(report, sys.argv[2])


if __name__ == "__main__":
    main()
