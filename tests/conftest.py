import torch

# The suite's models are tiny: one thread avoids the cost of splitting small matmuls across cores.
torch.set_num_threads(1)
