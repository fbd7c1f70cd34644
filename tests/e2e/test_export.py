"""export: the merged model's logits equal base + adapter logits; the adapter copy loads with peft."""

import pytest
import torch

from tests.harness.common import TINY, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_logits_equal_base_plus_adapter(tmp_path, method):
    out = tmp_path / "run"
    run_cli("train", overrides=TINY + [f"model.method={method}", "train.max_steps=4"], output_dir=out)
    p = run_cli("export", str(out), "--merge")
    assert "exported merged model" in p.stdout
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out / "export"), dtype=torch.float32).eval()
    # the reference: the full-precision base (never the 4-bit copy) with the adapter applied
    base = AutoModelForCausalLM.from_pretrained(str(out / "base-model"), dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, str(out / "final")).eval()
    ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # the adapter is not a no-op: the merged model differs from a fresh base (peft modified `base` in place)
    fresh = AutoModelForCausalLM.from_pretrained(str(out / "base-model"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (a - fresh(input_ids=ids).logits).abs().max() > 1e-4


def test_export_adapter_as_is_to_file_remote(tmp_path):
    out = tmp_path / "run"
    run_cli("train", overrides=TINY + ["model.method=lora", "train.max_steps=4"], output_dir=out)
    p = run_cli("export", str(out), "--to", f"file://{tmp_path / 'bucket'}")
    dest = tmp_path / "bucket" / "export"
    assert (dest / "adapter_model.safetensors").exists() and (dest / "manifest.json").exists(), p.stdout


def test_export_without_final_is_a_one_line_error(tmp_path):
    p = run_cli("export", str(tmp_path), check=False)
    assert p.returncode == 2 and "no finished run to export" in p.stderr and "Traceback" not in p.stderr
