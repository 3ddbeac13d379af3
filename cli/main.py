"""The ``diga`` command. Every user mistake ends as one line on stderr and exit status 2."""

from __future__ import annotations

import sys

import click

from diga_fast.errors import DigaError, Stopped


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="diga-fast", prog_name="diga")
def cli() -> None:
    """diga-fast: DiGA domain-adaptive semantic segmentation (synthetic -> real)."""


def _register() -> None:
    from diga_fast.cli.bench import bench
    from diga_fast.cli.data import data
    from diga_fast.cli.demo import demo
    from diga_fast.cli.evaluate import eval_command, predict
    from diga_fast.cli.labels import centroids, pseudo_label
    from diga_fast.cli.recipe import recipe
    from diga_fast.cli.export import export
    from diga_fast.cli.train import train
    from diga_fast.cli.weights import weights

    for command in (train, pseudo_label, centroids, eval_command, predict, export, data, demo, bench, recipe, weights):
        cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="diga", standalone_mode=False)  # an explicit Exit(N) returns N
        if "torch" in sys.modules:  # under torchrun: leave the process group together (not for --help)
            from diga_fast.utils import dist

            dist.shutdown()
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Exit as stop:
        sys.exit(stop.exit_code)
    except click.exceptions.Abort:
        click.echo("diga: aborted", err=True)
        sys.exit(130)
    except click.UsageError as err:
        where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        click.echo(f"diga: error: {err.format_message()}{where}", err=True)
        sys.exit(2)
    except click.ClickException as err:
        click.echo(f"diga: error: {err.format_message()}", err=True)
        sys.exit(err.exit_code or 1)
    except DigaError as err:
        click.echo(f"diga: error: {err}", err=True)
        sys.exit(2)
    except Stopped as stop:  # SIGTERM / SIGUSR1 / SIGINT in a training loop: checkpoint written
        click.echo(f"diga: {stop}", err=True)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:
        click.echo("diga: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
