"""Pipeline parallelism: stage partitioning, schedules (pure), and the stage's trainer."""
