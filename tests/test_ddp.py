"""Validation metrics under `Trainer(strategy="ddp", devices=2)` on CPU (gloo) equal a single process's.

The policy and the reference are two different tiny models, so every metric is far from its step-0
value; 8 validation pairs in batches of 3 split unevenly across batches, so a mean of batch means
would differ from the exact mean the metrics must give. Each run is a subprocess executing this file,
because Lightning's DDP launcher re-runs the command that started it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def validate(policy: str, reference: str, devices: int, out: Path) -> dict[str, float]:
    subprocess.run([sys.executable, __file__, policy, reference, str(devices), str(out)], check=True, timeout=600,
                   cwd=out.parent)
    return json.loads(out.read_text())


def test_ddp_validation_metrics_equal_single_process(tiny_llama, other_llama, tmp_path):
    single = validate(tiny_llama, other_llama, 1, tmp_path / "single.json")
    ddp = validate(tiny_llama, other_llama, 2, tmp_path / "ddp.json")
    assert set(single) == set(ddp) and "val/rewards/margin_length_corr" in single
    assert abs(single["val/rewards/margins"]) > 1e-3  # the two models really differ
    for name, value in single.items():
        assert ddp[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


if __name__ == "__main__":
    import lightning as L

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import ascii_tokenizer, rows

    from dpo_lightning import DPOModule, PreferenceDataModule

    policy, reference, devices, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    data = PreferenceDataModule(dataset=rows(8), eval_dataset=rows(8), tokenizer=ascii_tokenizer(), max_length=48,
                                max_prompt_length=24, batch_size=3)
    model = DPOModule(policy, ref_model_name_or_path=reference)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, data, verbose=False)[0]
    if trainer.is_global_zero:
        out.write_text(json.dumps({k: float(v) for k, v in metrics.items()}))
