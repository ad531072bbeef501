"""The virtual-time simulator: the live pipeline's components around a discrete-event loop."""
