"""vitexp's Optuna sweeper (`vitexp/search.py`) where Hydra accepts it: it instantiates a sweeper only from a class
in the `hydra_plugins` package, and it imports this module whenever it looks for plugins, so optuna (seconds to
import) is imported only when the sweeper is built, as the plugin itself does.

`hydra/sweeper=optuna` (which `hparams_search=optuna` selects) is pointed at `OptunaSweeper`, with the plugin's
own schema and defaults, so a search continues its study when relaunched.
"""

from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra_plugins.hydra_optuna_sweeper import optuna_sweeper
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf


class OptunaSweeper(optuna_sweeper.OptunaSweeper):
    """`hydra/sweeper=optuna`: the plugin's sweeper, running `vitexp.search.SearchSweeper`."""

    def __init__(self, **kwargs: Any) -> None:
        from vitexp.search import SearchSweeper

        self.sweeper = SearchSweeper(**kwargs)


class OptunaTarget(SearchPathPlugin):
    """Stores `hydra/sweeper=optuna` with `OptunaSweeper` as its target, after the plugin stored its own (Hydra calls
    search-path plugins once every plugin module is imported)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        node = OptunaSweeperConf(_target_=f"{__name__}.OptunaSweeper")
        ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=node, provider="vitexp")
