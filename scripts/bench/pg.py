"""PostgreSQL for the figures that compare the two engines: the cluster scripts/postgres.sh
keeps (shared with the tests; started if it is not running, never stopped here) and, per
server, a database of its own, dropped with the server."""

import itertools
import os
import re
import subprocess

from .common import REPO

_cluster = []  # the admin URL, once known
_names = itertools.count()


def cluster_url():
    """The admin URL of the cluster (`postgres://postgres@/postgres?host=SOCK&port=PORT`)."""
    if not _cluster:
        out = subprocess.run([os.path.join(REPO, "scripts", "postgres.sh"), "start"],
                             capture_output=True, text=True, check=True).stdout
        _cluster.append(out.strip().splitlines()[-1])
    return _cluster[0]


def _psql(sql):
    subprocess.run(["psql", "-qAt", "-v", "ON_ERROR_STOP=1", "-d", cluster_url(), "-c", sql],
                   capture_output=True, text=True, check=True)


def create_db():
    """A new, empty database: (name, its URL)."""
    name = f"bench_{os.getpid()}_{next(_names)}"
    _psql(f"CREATE DATABASE {name}")
    return name, re.sub(r"/postgres\?", f"/{name}?", cluster_url(), count=1)


def drop_db(name):
    """Drops a database made by create_db (its connections ended first)."""
    _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def settings():
    """How the cluster runs, for the notes: `fsync=off, synchronous_commit=on`."""
    out = subprocess.run(["psql", "-qAt", "-d", cluster_url(), "-c",
                          "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) "
                          "FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', "
                          "'max_connections')"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip()
