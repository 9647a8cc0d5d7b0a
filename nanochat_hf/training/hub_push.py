"""`--push_to_hub` / `--hub_model_id` through the Trainer's own hooks, uploading what `nanochat-hf push` uploads.

The Trainer's push sends its output folder with a generic card ("This model is a fine-tuned version of ...") and
no model code, so the repo would not load with ``trust_remote_code``. :class:`HubPushMixin` keeps the Trainer's
path (the repo created when the Trainer is, a push at each checkpoint save per ``hub_strategy``, and
``trainer.push_to_hub()`` at the end, which every stage calls when ``push_to_hub`` is set), but each upload is a
folder staged by :func:`nanochat_hf.hub.push.stage_model_repo`: safetensors weights, config.json with ``auto_map``,
the model code, the tokenizer and chat template, and our model card. Uploads complete before the call returns.
"""

import tempfile
from pathlib import Path

from transformers.trainer_utils import HubStrategy


class HubPushMixin:
    """Mix in before a Trainer class."""

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """The Trainer's `push_to_hub`, uploading the model as it is now (every rank saves, the main one uploads)."""
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        with tempfile.TemporaryDirectory(prefix="nanochat-hf-push-") as tmp:
            model_dir = Path(tmp) / "model"
            if self.args.should_save:
                self.accelerator.unwrap_model(self.model).save_pretrained(model_dir)
                self.processing_class.save_pretrained(model_dir)
            self.accelerator.wait_for_everyone()
            if not self.is_world_process_zero():
                return None
            return self._upload_model(model_dir, commit_message, token=token, revision=revision)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        message = f"Training in progress, step {self.state.global_step}"
        self._upload_model(Path(checkpoint_folder), message)
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            from huggingface_hub import HfApi

            # the whole checkpoint (optimizer, data state), for resuming elsewhere, as the Trainer's strategy says
            name = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
            HfApi().upload_folder(repo_id=self.hub_model_id, folder_path=checkpoint_folder, path_in_repo=name,
                                  commit_message=f"{message}, checkpoint", token=self.args.hub_token,
                                  revision=self.args.hub_revision)

    def _upload_model(self, model_dir: Path, commit_message: str | None, token: str | None = None,
                      revision: str | None = None):
        from huggingface_hub import HfApi

        from ..hub.push import stage_model_repo  # imported here: only a push needs the card's code

        with tempfile.TemporaryDirectory(prefix="nanochat-hf-push-") as tmp:
            staged = stage_model_repo(model_dir, Path(tmp) / "repo", self.hub_model_id, link_weights=True)
            return HfApi().upload_folder(repo_id=self.hub_model_id, folder_path=staged, commit_message=commit_message,
                                         token=token or self.args.hub_token, revision=revision or self.args.hub_revision)
