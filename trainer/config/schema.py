"""The config schema: one dataclass per section; their signatures are the documentation of every key.

README "Config reference" lists the sections; `trainer.config.loader` builds a Config from YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import yaml


@dataclass
class BuiltinModelConfig:
    """Shape of the built-in tiny Llama (used when model.name_or_path is 'builtin:tiny-llama')."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-llama"
    method: Literal["lora", "qlora", "full"] = "full"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # sdpa | eager | flash_attention_2; None = transformers' choice
    trust_remote_code: bool = False
    builtin: BuiltinModelConfig = field(default_factory=BuiltinModelConfig)
    # speed (trainer/speed.py); "auto" = on where known safe and faster (a CUDA GPU), off on the CPU
    liger_kernels: bool | Literal["auto"] = "auto"  # fused RMSNorm/SwiGLU/RoPE, loss without full logits
    packed_attention: Literal["auto", "varlen", "mask"] = "auto"  # data.packing: flash per document, or a mask
    kbit_bf16_frozen: bool | Literal["auto"] = "auto"  # qlora: keep norms/embeddings/lm_head bf16, not fp32
    checkpoint_layers: int | Literal["auto"] | None = "auto"  # layers to checkpoint; auto: fewest that fit
    # what a checkpointed layer recomputes: all of it, or only its attention or its MLP (auto then checkpoints
    # whole layers only when every layer with that part checkpointed does not fit)
    checkpoint_parts: Literal["layer", "attention", "mlp"] = "layer"
    memory_budget_gb: float | None = None  # GiB that checkpoint_layers=auto may plan for; None: all free
    mirror: bool = False  # keep a copy of the base model in checkpoint.remote; a fresh pod pulls it from there
    # QLoRA (4-bit): the mirror holds the weights as bitsandbytes serializes them once quantized (about a third of
    # the bytes of bf16), and a fresh pod loads them without quantizing again; bitwise the same weights
    mirror_4bit: bool = False


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


@dataclass
class QuantConfig:
    """bitsandbytes quantization of the frozen base weights (method: qlora)."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


@dataclass
class BuiltinDataConfig:
    """The generated instruction dataset used when data.path is 'builtin:tasks'."""

    tasks: list[str] = field(default_factory=lambda: ["reverse", "sort", "add"])
    num_train: int = 4000
    num_eval: int = 200
    min_len: int = 3
    max_len: int = 8


@dataclass
class DataConfig:
    path: str = "builtin:tasks"  # file (jsonl/json/parquet/csv/txt), saved dataset dir, hub name, or builtin:tasks
    format: Literal["text", "alpaca", "chat", "completion"] = "completion"
    split: str = "train"
    max_length: int = 512
    packing: bool = False
    eval_split: float | str | None = 0.05  # fraction of the data, or a file path; None = no eval
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)


@dataclass
class TrainConfig:
    seed: int = 42
    max_steps: int | None = None  # None: run `epochs` over the data
    epochs: float = 1.0
    micro_batch_size: int = 8
    grad_accum: int | None = None  # None: derived from global_batch_size, else 1
    global_batch_size: int | None = None  # samples per optimizer step over all processes
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"] = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    log_every_steps: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class EvalConfig:
    every_steps: int | None = None  # None: only before and after training
    max_samples: int = 200
    generate: bool = True  # greedy-decode eval prompts and report exact-match accuracy
    max_new_tokens: int = 32
    before_training: bool = True


@dataclass
class S3Config:
    endpoint_url: str | None = None  # None: AWS; else R2/B2/GCS/MinIO/SeaweedFS URL
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    profile: str | None = None  # credentials come from boto3's normal chain; never from this file
    part_size_mb: int = 64
    max_concurrency: int = 8
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_attempts: int = 8
    deadline_s: float = 900.0  # time one operation may take, retries included; a transfer gets more for its size
    min_throughput_mb_s: float = (
        1.0  # a transfer of N MB may also take N / this many seconds (a slow link still gets there)
    )


@dataclass
class CheckpointConfig:
    every_steps: int | None = 100
    every_minutes: float | None = None
    keep_last: int | None = 3  # local retention; the newest committed checkpoint is never deleted
    remote: str | None = None  # s3://bucket/prefix or file:///path
    remote_keep_last: int | None = None  # None: same as keep_last
    remote_wait_s: float = 600.0  # at start, how long to wait for an unreachable remote before exiting 69 (resumable)
    # the NAME of an environment variable holding a signing key (never the key): manifests are signed with
    # HMAC-SHA256 and unsigned or badly signed checkpoints (local or remote) are refused; None: signing off
    sign_key_env: str | None = None
    s3: S3Config = field(default_factory=S3Config)


@dataclass
class PreemptionConfig:
    watch: Literal["auto", "none", "aws", "gcp", "azure"] = "auto"
    poll_seconds: float = 5.0
    grace_seconds: float = 25.0  # assumed time left after SIGTERM when no notice gave a deadline
    metadata_url: str | None = None  # the metadata service's base URL; None: the cloud's link-local address


@dataclass
class SupervisorConfig:
    max_restarts: int = 20
    hang_timeout: float = 900.0  # seconds without a heartbeat before the run is killed and restarted
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 120.0
    num_processes: int | Literal["auto"] = 1  # per machine; "auto": one per visible GPU
    accelerate_config: str | None = None  # launch/<x>.yaml; None: a plain process (or auto multi-GPU)
    # several machines (SkyPilot num_nodes > 1): each runs `spot-trainer run` with its own machine_rank;
    # accelerate gets num_processes x num_machines processes in all
    num_machines: int = 1
    machine_rank: int = 0  # 0 on the main machine, 1..num_machines-1 on the others
    main_process_ip: str | None = None  # the address of machine_rank 0, reachable from every machine
    main_process_port: int = 29500  # a port open between the machines (used when num_machines > 1)


@dataclass
class DistributedConfig:
    deepspeed: str | None = None  # zero2 | zero2_offload | path to a DeepSpeed JSON
    # seconds a collective may wait for a peer, and the others for a silent rank 0, before the run stops to be
    # restarted (rank-0-only phases such as a pull are not bounded by it while rank 0 is alive)
    timeout_s: float = 600.0
    # false: each node has an output dir of its own (SkyPilot, plain cloud VMs): every node uploads its ranks'
    # checkpoint files to checkpoint.remote and rank 0 commits the manifest there; a restart pulls from it
    shared_output_dir: bool = True


Tracker = Literal["tensorboard", "wandb", "mlflow"]


@dataclass
class LoggingConfig:
    """Experiment trackers (trainer/trackers.py): one tracker run per output dir, continued across restarts."""

    report_to: list[Tracker] = field(default_factory=list)  # none by default; metrics.jsonl is always written
    project: str | None = None  # W&B project, MLflow experiment; None: "spot-trainer"
    run_name: str | None = None  # None: the output dir's name
    tags: list[str] = field(default_factory=list)
    # per tracker, passed on to it: wandb -> wandb.init (entity, mode, dir...), mlflow -> tracking_uri, description,
    # tensorboard -> SummaryWriter (flush_secs...); never secrets: those stay in the environment (WANDB_API_KEY...)
    init_kwargs: dict[Tracker, dict] = field(default_factory=dict)


@dataclass
class Config:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
