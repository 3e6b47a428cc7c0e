"""Exception types. Each names what was wrong and where; the CLI prints them without a traceback."""


class FedmetaError(Exception):
    """Base class of every error fedmeta raises on purpose (bad input, bad config, refused delta)."""


class ConfigError(FedmetaError, ValueError):
    """A configuration file, key or value is invalid."""


class DataError(FedmetaError, ValueError):
    """A site's data file is missing, malformed or unusable for the requested tasks."""


class DeltaError(FedmetaError, ValueError):
    """A client's reply (delta, meta-gradient) failed validation on the server."""


class ProvisionError(FedmetaError):
    """Provisioning or launching a deployment failed (certificates, keys, processes)."""


class PolicyRefusal(FedmetaError):
    """A request breaks a site's policy; the message names the rule and the counts only."""
