"""The interpretation CLI config parses and runs one fast_dev_run step."""

from pathlib import Path

from lightning_robust.cli import LightningRobustCLI

REPO = Path(__file__).resolve().parents[1]


def test_interpretation_config_fast_dev_run(tmp_path):
    cli = LightningRobustCLI(args=["fit", "--config", str(REPO / "configs" / "interpretation_digits.yaml"),
                                   "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                                   "--trainer.enable_progress_bar=false"])
    model = cli.model
    assert type(model).__name__ == "InterpretationRegularizedClassifier"
    assert type(model.interpretation_attack).__name__ == "TopKSaliencyAttack"
    assert model.interpretation_attack.steps == 5 and model.saliency_weight == 20.0
    assert cli.trainer.global_step == 1
    assert any(type(c).__name__ == "SaliencyCertification" for c in cli.trainer.callbacks)
