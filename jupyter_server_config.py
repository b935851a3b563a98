"""JupyterLab settings for the lessons (``make lab`` passes this file with ``--config``).

Lessons are committed without outputs. A learner who runs one in JupyterLab sees every
output in the browser; when JupyterLab saves the notebook (it autosaves), this hook
writes it without outputs or execution counts, so ``git status`` stays clean and the
tests never read a learner's run. The trade-off: reopening a lesson shows no outputs
until it runs again (``make report`` keeps executed copies under ``reports/``).
"""


def strip_outputs(model, **kwargs):
    """A ContentsManager pre-save hook: drop code cells' outputs and execution counts."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    for cell in model["content"].get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None


c = get_config()  # noqa: F821  (provided by Jupyter when it loads this file)
c.FileContentsManager.pre_save_hook = strip_outputs
c.ServerApp.root_dir = "notebooks"
