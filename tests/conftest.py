import torch

# Tiny models run fastest on one thread, and several threads thrash when other work shares the CPU.
torch.set_num_threads(1)
