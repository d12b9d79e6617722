"""`python -m lowbit.open_clip_train [--lowbit-* flags] [open_clip_train flags]`: see
lowbit.integrations.open_clip_train."""

import sys

from lowbit.integrations.open_clip_train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
