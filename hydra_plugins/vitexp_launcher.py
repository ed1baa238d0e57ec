"""vitexp's submitit launchers (`vitexp/launcher.py`) where Hydra accepts them: it instantiates a launcher only from
a class in the `hydra_plugins` package, and it imports this module whenever it looks for plugins.

`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml) selects `SlurmLauncher`; the plugin's own
`hydra/launcher=submitit_local` is pointed at `LocalLauncher`, so the command users already know gets the
launcher that notices lost jobs.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf

from vitexp import launcher


class LocalLauncher(launcher.LocalLauncher):
    """`hydra/launcher=submitit_local`."""


class SlurmLauncher(launcher.SlurmLauncher):
    """`hydra/launcher=slurm`."""


class SubmititLocalTarget(SearchPathPlugin):
    """Stores `hydra/launcher=submitit_local` with `LocalLauncher` as its target and the plugin's schema and defaults.

    Hydra calls search-path plugins after importing every plugin module, so this replaces the entry that the
    submitit plugin stores when it is imported (after this module). A YAML file of the same name would work too,
    but Hydra warns on every run that validating it against the plugin's schema is deprecated.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        node = LocalQueueConf(_target_=f"{__name__}.LocalLauncher")
        ConfigStore.instance().store(group="hydra/launcher", name="submitit_local", node=node, provider="vitexp")
