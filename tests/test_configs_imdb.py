"""The IMDB SPGD configs parse and the CPU one trains (fast_dev_run) on a tiny IMDB-format folder."""

from pathlib import Path

import pytest

from lightning_robust.attacks import SPGD
from lightning_robust.cli import LightningRobustCLI
from tests.helpers.imdb import make_imdb_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.text
@pytest.mark.parametrize("name", ["imdb_spgd.yaml", "imdb_spgd_cpu.yaml"])
def test_imdb_configs_fast_dev_run(tmp_path, name):
    imdb = make_imdb_folder(tmp_path / "imdb", n_train=6, n_test=3)
    args = ["fit", "--config", str(REPO / "configs" / name), "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu", f"--data.init_args.data_dir={imdb}", "--data.init_args.download=false",
            "--data.init_args.batch_size=4", "--data.init_args.limit_train=null", "--data.init_args.limit_test=null",
            "--data.init_args.max_length=32"]
    if name == "imdb_spgd.yaml":  # the paper-scale LSTM: parse and build, shrink the width for the smoke run
        args.append("--model.init_args.net.init_args.hidden_size=8")
    cli = LightningRobustCLI(args=args)
    assert cli.trainer.global_step == 1
    assert isinstance(cli.model.attack, SPGD) and cli.model.attack.max_words == 5
    assert cli.model.net.get_input_embeddings().weight.shape == (20000, 50)
    assert "val/attack_success" in cli.trainer.callback_metrics
