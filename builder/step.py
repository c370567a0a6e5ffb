"""What one build step may use: the :class:`StepContext` an instruction is prepared and executed
against (see :mod:`builder.instructions` for the life cycle).

The context is deliberately narrow. A step sees the layer stack it builds on (as a read-only merged
view), the stage's image config and variables, and the build's services: the context directory, the
build cache, the workspace where layers are written and committed, downloads, the lent secrets, the
lookup of other stages and images, and the RUN and COPY engines. It never sees the builder, so the
code that executes steps (:mod:`builder.running`, :mod:`builder.copying`) does not depend on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from builder.fsops import LayerView
from builder.record import Record, record
from unionfs.core.stack import LayerStack

if TYPE_CHECKING:
    from typing import Protocol

    from builder.cache import BuildCache
    from builder.context import BuildContext
    from builder.instructions import ImageConfig, Instruction
    from builder.interruption import Interruption
    from builder.layer_instructions import CopyStep, RunStep
    from builder.remote import Downloads
    from builder.session import Session
    from builder.variables import StageScope
    from builder.workspace import Workspace
    from lamina.store import Layer

    # The services' types, for the type checker only (defining protocols costs start-up time).
    class SourceLookup(Protocol):
        def __call__(self, ref: str, before: int, where: Instruction) -> Source:
            """The stage named ``ref`` (built first if need be; only stages before index ``before``
            count), else the image ``ref`` (pulled if need be). Raises naming ``where``."""
            ...

    class RunService(Protocol):
        def __call__(self, step: RunStep, ctx: StepContext) -> Layer | None:
            """Run the step's command in the sandbox; the layer it made, None when it changed nothing."""
            ...

    class CopyService(Protocol):
        def __call__(self, step: CopyStep, ctx: StepContext, tmp: Path, diff: Path) -> None:
            """Write the files of a COPY or ADD into the layer directory ``diff`` (``tmp`` is scratch)."""
            ...

    class DirService(Protocol):
        def __call__(self, path: str, ctx: StepContext, diff: Path) -> None:
            """Write the directory ``path`` of the image, and its missing parents, into ``diff``."""
            ...


@record
class Source(Record):
    """Files a step reads from another stage or an image (``COPY --from``, ``RUN --mount from=``):
    their merged view, and a key standing for their content in the cache key."""

    view: LayerView
    key: str


@record
class BuildServices(Record):
    """What the steps of one build share; made once per build by the builder."""

    context: BuildContext
    cache: BuildCache
    workspace: Workspace
    downloads: Downloads
    interruption: Interruption
    session: Session
    sources: SourceLookup
    run: RunService
    copy: CopyService
    make_workdir: DirService
    quiet: bool  # RUN's output is shown only when it fails
    epoch: int | None  # SOURCE_DATE_EPOCH
    network: str = "default"  # build --network: what RUN's own "default" means
    ulimits: tuple[tuple[str, int, int], ...] = ()  # build --ulimit: (name, soft, hard) for RUN steps


@record
class StepContext(Record):
    """One step of one stage: the layers below it, the config and variables so far, the services."""

    stage_name: str | None
    stage_index: int
    layers: tuple[Layer, ...]  # bottom first, as the image lists them
    image: ImageConfig  # the stage's config before this step (its update_config changes it after)
    scope: StageScope
    services: BuildServices

    def lowers(self) -> LayerStack:
        """The layer directories as a stack (a union mount's lowers)."""
        return LayerStack.from_bottom_up(layer.path for layer in self.layers)

    def view(self) -> LayerView:
        """The image so far, merged, read-only."""
        return LayerView(self.lowers())

    def source(self, ref: str, where: Instruction) -> Source:
        """Another stage (before this one) or an image, by name: see :class:`SourceLookup`."""
        return self.services.sources(ref, self.stage_index, where)

    @property
    def epoch(self) -> int | None:
        return self.services.epoch
