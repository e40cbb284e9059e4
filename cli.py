"""Command-line conventions shared by every script."""


def switch(add_argument, name, default=0, help=""):
    """An on/off flag that accepts `--name`, `--name 1` and `--name 0` (bare means 1), as users type
    both forms. Its value is the int 0 or 1."""
    add_argument(name, type=int, choices=[0, 1], nargs="?", const=1, default=default, metavar="0|1",
                 help=(help + " " if help else "") + "(bare: 1)")
