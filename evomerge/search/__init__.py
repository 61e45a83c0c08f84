"""Search: optimizers behind one ask/tell interface, the driver loop, checkpoint and resume."""
