"""Exception types shared across tabrec: user-input errors are distinct from internal failures."""


class TabrecError(Exception):
    """Base class for errors tabrec raises on purpose."""


class DataError(TabrecError, ValueError):
    """Bad user input (file, column, row, value): the CLI exits 2 and the service answers 4xx."""
