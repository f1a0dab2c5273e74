"""`python -m ray_unlearn ...`: the same as the `ray-unlearn` command."""

from ray_unlearn.cli import main

if __name__ == "__main__":
    main()
