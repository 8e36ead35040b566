"""docs/extending.md's worked example: a user hook file on the command line ends up as its own
section of the generated report (and in the results table), with no other code."""

import re
from pathlib import Path

import torch
from iclgd_lens.hooks import PROBES
from typer.testing import CliRunner

from iclgd_lens.cli import app
from iclgd_lens.engine.results import Results

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _tiny_model_folder(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from iclgd_lens.models.making.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_hook_file_from_the_docs_gets_a_report_section(tmp_path):
    probe_code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    assert '@probe("mlp_out"' in probe_code
    hook_file = tmp_path / "mlp_probe.py"
    hook_file.write_text(probe_code)
    model = _tiny_model_folder(tmp_path / "model")
    try:
        result = CliRunner().invoke(
            app,
            [
                "report",
                "--model",
                str(model),
                "--hooks",
                str(hook_file),
                "--k",
                "2",
                "--episodes",
                "1",
                "--queries",
                "4",
                "--out",
                str(tmp_path / "rep"),
                "--no-progress",
                "--threads",
                "1",
            ],
        )
    finally:
        PROBES.pop("mlp_out", None)
    assert result.exit_code == 0, result.output
    table = Results.load(tmp_path / "rep").table
    rows = table[(table.metric == "probe:mlp_out") & (table.comparison == "icl~gd")]
    assert sorted(rows.layer.unique()) == [0, 1] and rows.value.notna().all()
    index = (tmp_path / "rep" / "index.html").read_text()
    assert "probe:mlp_out" in index
