"""CIFAR-10 benchmark harness: data kept and augmented on the GPU, models, arms, training loop."""
