"""MARLIN pretraining: losses, train state, jit-able steps, checkpoints, metrics, trainer loop."""
