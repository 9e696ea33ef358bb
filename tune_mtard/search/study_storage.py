"""Where a search's Optuna study lives (docs/cluster.md, "The Optuna study in a database").

By default a SQLite file in the search folder, ``<storage>/<name>/optuna.db``, which only the driver opens.
``search.optuna_storage`` names a database instead: any SQLAlchemy URL Optuna accepts, for example
``postgresql://user@host:5432/db``. Its driver is an optional extra of the package; a missing driver, a
database that cannot be reached, or (for a new search) a study of the same name already in it are bad
input, found before anything is started or written.
"""

from __future__ import annotations

from pathlib import Path

from tune_mtard.config import Config
from tune_mtard.errors import ConfigError
from tune_mtard.files import OPTUNA_DB

KEY = "search.optuna_storage"
# The package extra that installs a URL's database driver (pyproject.toml): SQLAlchemy's default for
# postgresql:// is psycopg (version 3).
DRIVER_EXTRAS = {"postgresql": "postgres", "postgresql+psycopg": "postgres"}
CONNECT_TIMEOUT_S = 10


def optuna_storage_url(cfg: Config, folder: Path) -> str:
    """The study's SQLAlchemy URL: ``search.optuna_storage``, or the SQLite file in the search folder."""
    assert cfg.search is not None
    return cfg.search.optuna_storage or f"sqlite:///{folder / OPTUNA_DB}"


def uses_database(cfg: Config) -> bool:
    return cfg.search is not None and bool(cfg.search.optuna_storage)


def study_exists(url: str, study_name: str) -> bool:
    """Whether the storage holds the study; a SQLite file that does not exist is not created to find out."""
    import optuna

    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        return False
    return study_name in optuna.get_all_study_names(url)


def check_database(cfg: Config, resume: bool) -> None:
    """With ``search.optuna_storage`` given: its driver is installed, the database answers, and a new search's
    study name is not taken in it (a resumed search's must be there). ConfigError (exit 2) otherwise."""
    if not uses_database(cfg):
        return
    url = cfg.search.optuna_storage
    check_reachable(url)
    exists = study_exists(url, cfg.name)
    if resume and not exists:
        raise ConfigError(KEY, f"the database holds no Optuna study {cfg.name!r} to resume")
    if not resume and exists:
        raise ConfigError("name", f"the database of {KEY} already holds an Optuna study named {cfg.name!r}; "
                                  "pass --resume to continue that search, or --set name=NEW")


def check_reachable(url: str) -> None:
    """The URL's driver is installed and its database answers; ConfigError naming search.optuna_storage if not."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise ConfigError(KEY, f"not an SQLAlchemy database URL: {exc}") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        extra = DRIVER_EXTRAS.get(parsed.drivername)
        hint = f"pip install 'tune-mtard[{extra}]'" if extra else f"install the database driver ({exc.name})"
        raise ConfigError(KEY, f"the {parsed.get_backend_name()} driver is not installed: {hint}") from None
    args = {"connect_timeout": CONNECT_TIMEOUT_S} if parsed.get_backend_name() == "postgresql" else {}
    engine = sqlalchemy.create_engine(parsed, connect_args=args)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
        raise ConfigError(KEY, f"cannot connect to {parsed.render_as_string(hide_password=True)}: "
                               f"{reason[0] if reason else type(exc).__name__}") from None
    finally:
        engine.dispose()


def delete_study(cfg: Config) -> None:
    """Drop the study a new search created in the database before it failed in its own setup."""
    import optuna

    if uses_database(cfg) and study_exists(cfg.search.optuna_storage, cfg.name):
        optuna.delete_study(study_name=cfg.name, storage=cfg.search.optuna_storage)
