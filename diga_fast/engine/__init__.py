"""What runs a stage but is not the method: the run folder, checkpoints and resume (run), console,
progress and image grids (logging), the optimiser and its schedule (optim), device and seeding (device)."""
