"""``radixpert-phantom``: write a synthetic dataset from the command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from radixpert.errors import DEBUG_ENV, EXIT_INTERNAL, EXIT_USAGE, RadixpertError
from radixpert.phantom.render import MIN_SIZE
from radixpert.phantom.writers import write_dataset


class _OneLineErrors(click.Command):
    """Report bad options and refused inputs as one line on stderr, without a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        prog = "radixpert-phantom"  # not prog_name: test runners pass the function name
        try:
            rv = super().main(args=args, prog_name=prog, complete_var=complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo(f"{prog}: error: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"{prog}: error: {exc.format_message()}", err=True)
            sys.exit(EXIT_USAGE)
        except RadixpertError as exc:
            click.echo(f"{prog}: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            click.echo(f"{prog}: error: {exc.strerror or exc} ({exc.filename})", err=True)
            sys.exit(EXIT_USAGE)
        except Exception as exc:  # a bug: the class only (messages can quote paths); the traceback on request
            if os.environ.get(DEBUG_ENV):
                raise
            click.echo(f"{prog}: internal error: {type(exc).__name__}; please report it ({DEBUG_ENV}=1 shows the "
                       "traceback)", err=True)
            sys.exit(EXIT_INTERNAL)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.command(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of studies to generate.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Dataset seed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--size", type=click.IntRange(min=MIN_SIZE), default=1024, show_default=True,
              help="Image side in pixels.")
@click.option("--preview", is_flag=True, help="Also write preview.png, a captioned contact sheet.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: all CPUs).")
def main(n: int, seed: int, out: Path, size: int, preview: bool, workers: int | None) -> int:
    """Write synthetic PA chest radiographs with masks, findings and Spanish reports."""
    csv_path = write_dataset(out, n, seed, size=size, preview=preview, workers=workers)
    click.echo(f"wrote {n} studies to {out} ({csv_path.name})", err=True)
    return 0


if __name__ == "__main__":
    main()
