"""Models on flat buffers: layers, the Sequential model, losses, optimizers (no MPI here)."""
