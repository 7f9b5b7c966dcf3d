"""`python -m projlens_defense ...` (also what `accelerate launch -m projlens_defense ...` runs)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="projlens-defense")
