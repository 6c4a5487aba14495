"""miniai: a small deep-learning training library exported from the lesson notebooks."""
