"""Glue between lowbit and other people's training loops: open_clip_train and the Hugging Face Trainer.

Each submodule imports its library when it is imported, so `import lowbit` never needs them."""
