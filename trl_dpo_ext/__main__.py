"""`python -m trl_dpo_ext ...` (and `accelerate launch -m trl_dpo_ext dpo ...`): the `trl-dpo-ext` command."""

from .cli import main


if __name__ == "__main__":
    raise SystemExit(main())
