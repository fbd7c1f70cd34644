"""The CLI as a user runs it: train on a hand-written config, errors as one line with exit 2."""

import json

import pytest
from safetensors.torch import load_file

from tests.harness.common import TINY, run_cli

# the quick pass (-m 'not slow') keeps test_train_own_jsonl_data_with_lora: one real training run
pytestmark = pytest.mark.e2e


def test_train_own_jsonl_data_with_lora(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [
        {"instruction": f"Repeat {w}", "input": "", "output": w}
        for w in ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"] * 8
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "my.yaml"
    cfg.write_text(f"""
base: lora
data:
  path: {data}
  format: alpaca
  eval_split: 0.125
  max_length: 96
train:
  max_steps: 6
eval:
  every_steps: 3
  generate: true
  max_new_tokens: 8
""")
    out = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("train.max_steps", "eval.", "data.max_length"))]
    p = run_cli("train", str(cfg), overrides=overrides, output_dir=out)
    assert "step 6/6" in p.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 3, 6]  # before training, then every 3
    # final/: a peft adapter + tokenizer, loadable for inference
    final = out / "final"
    assert (final / "adapter_config.json").exists() and (final / "manifest.json").exists()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(final))
    assert model(input_ids=__import__("torch").tensor([[1, 5, 6]])).logits.shape[-1] == 101


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["train", "--set", "train.max_stepz=3"],
            "unknown config key 'train.max_stepz'; did you mean 'train.max_steps'?",
        ),
        (["train", "nope.yaml"], "nope.yaml: file not found"),
        (["train", "--set", "data.path=/nonexistent/data.jsonl"], "data.path /nonexistent/data.jsonl: file not found"),
        (["train", "--set", "model.name_or_path=/nonexistent/model"], "model.name_or_path /nonexistent/model"),
        (["train", "--set", "train.global_batch_size=7", "--set", "train.grad_accum=null"], "not a multiple"),
        (["train", "--resume", "/nonexistent/ckpt"], "--resume /nonexistent/ckpt: not a valid checkpoint"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, args, needle):
    p = run_cli(*args, output_dir=tmp_path / "o", check=False, timeout=120)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.slow
def test_wrong_format_for_data_names_fields(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    p = run_cli("train", overrides=[f"data.path={data}", "data.format=alpaca"], output_dir=tmp_path / "o", check=False)
    assert p.returncode == 2 and "needs field(s) instruction, output" in p.stderr and "question" in p.stderr


@pytest.mark.slow
def test_presets_and_resolved_config():
    p = run_cli("presets")
    assert {"default", "lora", "qlora", "full"} <= {line.split()[0] for line in p.stdout.splitlines()}
    p = run_cli("presets", "qlora", overrides=["train.max_steps=9"])
    assert "method: qlora" in p.stdout and "max_steps: 9" in p.stdout


@pytest.mark.slow
def test_ckpt_list_and_verify(tmp_path):
    run_cli("train", overrides=TINY + ["train.max_steps=8"], output_dir=tmp_path)
    p = run_cli("ckpt", "list", output_dir=tmp_path)
    assert [line.split()[0] for line in p.stdout.splitlines()[1:]] == ["4", "8"]
    assert run_cli("ckpt", "verify", output_dir=tmp_path).stdout.count(": ok") == 2
    (tmp_path / "checkpoints" / "step-00000008" / "model.safetensors").write_bytes(b"garbage")
    p = run_cli("ckpt", "verify", output_dir=tmp_path, check=False)
    assert p.returncode == 1 and "step 8: " in p.stdout and "size" in p.stdout


@pytest.mark.slow
def test_ckpt_push_list_remote_pull_prune(tmp_path):
    out, remote = tmp_path / "run", f"file://{tmp_path / 'bucket'}"
    run_cli("train", overrides=TINY + ["train.max_steps=8"], output_dir=out)
    assert (
        "nothing to push"
        not in run_cli("ckpt", "push", overrides=[f"checkpoint.remote={remote}"], output_dir=out).stdout
    )
    p = run_cli("ckpt", "list", "--remote", remote, output_dir=out)
    # step, date, time, size (2 words), kind, where, run, seq, parent, verified
    rows = [line.split() for line in p.stdout.splitlines()[1:]]
    assert [r[6] for r in rows] == ["both", "both"] and [r[8] for r in rows] == ["1", "2"]
    assert rows[1][9] == f"{rows[0][7]}@4" and p.stdout.rstrip().endswith("<- newest")
    # a fresh machine: pull the newest into an empty output dir
    fresh = tmp_path / "fresh"
    p = run_cli("ckpt", "pull", overrides=[f"checkpoint.remote={remote}"], output_dir=fresh)
    assert "pulled step 8" in p.stdout
    assert run_cli("ckpt", "verify", output_dir=fresh).stdout.strip() == "step 8: ok"
    run_cli("ckpt", "prune", "--keep-last", "1", "--remote", overrides=[f"checkpoint.remote={remote}"], output_dir=out)
    p = run_cli("ckpt", "list", "--remote", remote, output_dir=out)
    assert [line.split()[0] for line in p.stdout.splitlines()[1:]] == ["8"]
    p = run_cli("ckpt", "pull", output_dir=tmp_path / "x", check=False)
    assert p.returncode == 2 and "ckpt pull: set checkpoint.remote" in p.stderr
