"""One rank of the 2-process distillation test (started by torchrun from test_recovery_distributed.py).

argv: APPLY_DIR MODEL_FILE OUT_DIR RESULTS_DIR. Every rank distills APPLY_DIR into OUT_DIR (rank 0
alone writes it) and saves its own final student weights as RESULTS_DIR/rank<N>.safetensors, and
the names of the threads it still runs once the distillation (and its process group) is over as
RESULTS_DIR/threads<N>.txt (Linux: /proc/self/task).
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from convrewrite.commands.distill import distill_output
from convrewrite.core.loading import load_model
from convrewrite.recovery.batches import TensorBatches
from convrewrite.recovery.distill import DistillConfig


def main() -> None:
    apply_dir, model_file, out_dir, results = (Path(a) for a in sys.argv[1:5])
    teacher = load_model(str(model_file)).model
    samples = torch.randn(72, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    data = TensorBatches((samples,), batch_size=8, holdout=0.25)
    config = DistillConfig(steps=12, eval_every=4, lr=3e-3)
    job = distill_output(apply_dir, teacher, data, config, device="cpu", out=out_dir, progress="auto")
    rank = int(os.environ["RANK"])
    state = {k: v.contiguous() for k, v in job.model.state_dict().items()}
    save_file(state, str(results / f"rank{rank}.safetensors"))
    tasks = Path("/proc/self/task")
    if tasks.is_dir():
        names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
        (results / f"threads{rank}.txt").write_text("\n".join(names))


if __name__ == "__main__":
    main()
