"""The orchestrators: the integrated one (sessions in the database) and the standalone one
(workflow files). Both run their steps through one loop and one model client interface."""

from prompt_tool.orchestration.clients import (
    DEFAULT_CLIENT,
    ClientFactory,
    EchoClient,
    ModelClient,
    available_clients,
    load_client,
    register_client,
    resolve_client,
)
from prompt_tool.orchestration.errors import (
    ModelClientError,
    RunFailedError,
    SessionStateError,
    WorkflowError,
)
from prompt_tool.orchestration.orchestrator import DEFAULT_LIST_LIMIT, Orchestrator
from prompt_tool.orchestration.standalone import (
    DatabaseTemplates,
    DiskTemplates,
    TemplateSource,
    run_workflow,
)
from prompt_tool.orchestration.steps import (
    PlannedStep,
    StepRecorder,
    compose_input,
    run_steps,
)
from prompt_tool.orchestration.types import (
    PromptInfo,
    RunResult,
    RunStatus,
    SessionDetail,
    SessionStatus,
    SessionSummary,
    StepOutput,
    StepRecord,
    StepRequest,
    StepResult,
    StepStatus,
)
from prompt_tool.orchestration.workflow import (
    DEFAULT_TEMPLATES_DIR,
    TEMPLATE_SUFFIX,
    Workflow,
    WorkflowStep,
    load_workflow,
    parse_workflow,
)

__all__ = [
    "DEFAULT_CLIENT",
    "DEFAULT_LIST_LIMIT",
    "DEFAULT_TEMPLATES_DIR",
    "TEMPLATE_SUFFIX",
    "ClientFactory",
    "DatabaseTemplates",
    "DiskTemplates",
    "EchoClient",
    "ModelClient",
    "ModelClientError",
    "Orchestrator",
    "PlannedStep",
    "PromptInfo",
    "RunFailedError",
    "RunResult",
    "RunStatus",
    "SessionDetail",
    "SessionStateError",
    "SessionStatus",
    "SessionSummary",
    "StepOutput",
    "StepRecord",
    "StepRecorder",
    "StepRequest",
    "StepResult",
    "StepStatus",
    "TemplateSource",
    "Workflow",
    "WorkflowError",
    "WorkflowStep",
    "available_clients",
    "compose_input",
    "load_client",
    "load_workflow",
    "parse_workflow",
    "register_client",
    "resolve_client",
    "run_steps",
    "run_workflow",
]
