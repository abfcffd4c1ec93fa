import os

import torch

# Tiny models run fastest on one thread, and several threads thrash when other work shares the CPU.
torch.set_num_threads(1)

# Nothing in the tests may reach a model or dataset hub (lmms-eval and datasets would try).
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
