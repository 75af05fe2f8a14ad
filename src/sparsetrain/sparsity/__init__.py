"""The sparsity core: which tensors are sparse, their densities, schedules and selection."""
