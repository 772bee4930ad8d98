"""Beyond one card: torchrun-compatible launch, FSDP2 training, tensor-parallel inference for our model."""
