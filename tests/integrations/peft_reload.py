"""Load PEFT checkpoints of the selora bridge in a fresh process (run by test_peft_checkpoint.py).

Usage: ``python peft_reload.py REQUEST.pt REPORT.pt``. ``REQUEST.pt`` holds a
list of cases ``{"name", "kind", "seed", "path", "ids"}``; the report holds, per case,
the logits of ``PeftModel.from_pretrained`` on ``ids``, the loaded config and
the types of the loaded layers, and, first, what PEFT does with a selora
checkpoint before the bridge is imported.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from tiny_models import BUILDERS, logits


def type_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def main() -> None:
    request: list[dict[str, Any]] = torch.load(sys.argv[1])
    torch.set_num_threads(1)
    from peft import PeftModel

    report: dict[str, Any] = {}
    # Without the bridge, PEFT must refuse the checkpoint (never fall back to LoRA).
    assert "selora.integrations.peft" not in sys.modules
    first = request[0]
    try:
        PeftModel.from_pretrained(BUILDERS[first["kind"]](first["seed"]), first["path"])
        report["unregistered"] = "loaded"
    except Exception as exc:
        report["unregistered"] = f"{type(exc).__name__}: {exc}"

    from peft.tuners.tuners_utils import BaseTunerLayer

    import selora.integrations.peft  # noqa: F401 - registers the SELORA method

    for case in request:
        model = PeftModel.from_pretrained(BUILDERS[case["kind"]](case["seed"]), case["path"])
        config = model.peft_config["default"]
        report[case["name"]] = {
            "logits": logits(model, case["ids"]),
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
            "units": sorted(
                {
                    type_name(unit)
                    for module in model.modules()
                    for unit in getattr(module, "selora_units", {}).values()
                }
            ),
            "peft_model_class": type_name(model),
        }
    torch.save(report, sys.argv[2])


if __name__ == "__main__":
    main()
