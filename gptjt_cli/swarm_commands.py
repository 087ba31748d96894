"""Commands against a running swarm: export (the operator commands are in operator_commands)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .operator_client import BadArgument, call_status, open_channel, raise_for, read_metadata


def fetch_status(address: str, timeout: float = 10.0, tls_ca: str = "", read_token: str = "",
                 admin_token: str = "") -> dict:
    """The coordinator's status object (the same facts as the dashboard). Raises Unreachable
    (a RuntimeError) when the coordinator does not answer, Refused when it needs a read token
    (read_token, or the admin token: it reads too) and none was given."""
    return call_status(address, tls_ca, timeout, read_metadata(read_token, admin_token))


def export_holders(status: dict) -> list[list[str]]:
    """The workers each stage's weights are exported from: all its members (replicas holding the
    run's state), whose weights the export averages (gptjt_core/replica_mean.py: in "local-steps"
    mode they step apart between outer steps, and their mean is the run's model); where a stage has
    no member yet, its live worker with the smallest id (a joiner may still be copying the state).
    Raises RuntimeError for a stage with no live worker."""
    holders = []
    for stage in status["stages"]:
        if stage.get("members"):
            holders.append(sorted(stage["members"]))
        elif stage["workers"]:
            holders.append([min(stage["workers"])])
        else:
            raise RuntimeError(f"stage {stage['index']} has no live worker; cannot export it")
    return holders


CATCH_UP_TRIES = 3  # fetches again of the stages a step behind the others, before the export gives up
CATCH_UP_WAIT_S = 2.0  # between them: a step's update takes seconds to reach every stage


async def _fetch_all_stages(status: dict, credentials, skipped: list[str], reread: Callable[[], dict]) -> list[dict]:
    """Each stage's weights: the mean of its holders' (export_holders), all at one step
    (_stages_at_one_step). reread: the status, read again."""
    from worker.transport import LinkCounters, StageClient

    client = StageClient(LinkCounters(), 1 << 20, credentials=credentials)
    client.learn([w["address"] for w in status["workers"]], [w["id"] for w in status["workers"]])
    try:
        return await _stages_at_one_step(client, status, skipped, reread)
    finally:
        await client.close()


async def _stages_at_one_step(client, status: dict, skipped: list[str], reread: Callable[[], dict],
                              wait_s: float = CATCH_UP_WAIT_S) -> list[dict]:
    """Each stage's mean (_stage_mean), all at one step. On a live run a step's update reaches the
    stages one after another, so a stage fetched before it applied holds the step before the
    others': only such stages are fetched again, after a pause, up to CATCH_UP_TRIES times (a GPT-J
    6B stage is gigabytes). A holder that does not answer, or sends a state the mean refuses, is
    left out and named in `skipped` while another of its stage answers; with none, RuntimeError."""
    by_id = {w["id"]: w for w in status["workers"]}
    holders = [[(h, by_id[h]["address"]) for h in ids] for ids in export_holders(status)]
    states: list[dict] = [{} for _ in holders]
    steps: list[dict[str, int]] = [{} for _ in holders]  # per stage: holder -> the step it sent
    left_out: list[list[str]] = [[] for _ in holders]
    behind = list(range(len(holders)))
    for tries in range(CATCH_UP_TRIES + 1):
        if tries:
            await asyncio.sleep(wait_s)
        for index in behind:
            steps[index], left_out[index] = {}, []
            states[index] = await _stage_mean(client, index, holders[index], steps[index], left_out[index],
                                              AttestedDigests.of_stage(status, index), reread)
        newest = max(p for sent in steps for p in sent.values())
        behind = [i for i, sent in enumerate(steps) if set(sent.values()) != {newest}]
        if not behind:
            skipped.extend(reason for reasons in left_out for reason in reasons)
            return states
    positions = {h: p for sent in steps for h, p in sent.items()}
    raise RuntimeError(f"the replicas hold different steps {positions} after {CATCH_UP_TRIES} more fetches "
                       f"{wait_s:g} s apart (a step is not being applied everywhere); export again")


@dataclass(frozen=True)
class AttestedDigests:
    """What one stage's members reported to the ledger after each closed step the status lists (up
    to its last 200): the digests of the states they then held (gptjt_core/state_digest.py; of the
    anchor in local-steps mode), by the steps those states hold. Every state the export takes must
    match one of its step's. There is nothing to check against before any step closed, nor for a
    step whose row is of another layer range than the stage's now: digests cover a whole stage, so
    after a re-plan no member has reported one of the new range until a step closes on it."""

    by_position: dict[int, tuple[str, ...] | None]  # closed step + 1 -> digests (None: another range)

    @classmethod
    def of_stage(cls, status: dict, index: int) -> AttestedDigests:
        from gptjt_core.recorded_digests import recorded_digests

        stage, out = status["stages"][index], {}
        for row in status.get("history") or []:
            recorded = recorded_digests(row.get("stages", {}).get(str(index)))
            same_range = recorded is not None and recorded[0] == (stage["start_layer"], stage["end_layer"])
            out[row["step"] + 1] = recorded[1] if same_range else None
        return cls(out)

    def ahead(self, position: int) -> bool:
        """A state after `position` steps, newer than any step this status lists as closed."""
        return bool(self.by_position) and position > max(self.by_position)

    def unchecked(self, position: int) -> bool:
        """Is a state after `position` steps taken with nothing to check it against (see above)?"""
        return not self.by_position or self.by_position.get(position, ()) is None

    def refusal(self, position: int, tensors: dict) -> str:
        """Why a holder's state (safetensors tensors, after `position` steps) is none the members
        attested, or ''. A member serving other weights than it trained would otherwise move the
        mean by 1/k of whatever it chose. In local-steps mode the digest is of the anchor, so a
        member's inner steps since the last outer step are not attested (its drift is its own)."""
        from gptjt_core.state_digest import unattested

        if self.unchecked(position):
            return ""
        if self.ahead(position):
            return (f"it holds the state after {position} steps, which the status lists no digests of (the "
                    "newest closed step is older: export again once it closes)")
        if position not in self.by_position:
            return (f"it holds the state after {position} steps, older than every closed step the status lists "
                    f"(states after {min(self.by_position)}-{max(self.by_position)} steps): a replica left behind")
        return unattested(tensors, position, position, self.by_position[position])


async def _stage_mean(client, index: int, holders: list[tuple[str, str]], positions: dict,
                      skipped: list[str], attested: AttestedDigests, reread: Callable[[], dict]) -> dict:
    """The mean of stage `index`'s (worker id, address) holders' weights, fetched one at a time
    (memory holds the sums and one replica); each answering holder's step goes into `positions`.
    A holder whose state is none its stage's members attested (AttestedDigests) is left out; one
    at a step newer than the status lists (a step closed while the export ran) is checked
    against a status read again, once. RuntimeError when none of them sent its weights."""
    from safetensors.torch import load

    from gptjt_core.replica_mean import ReplicaMean
    from gptjt_core.stage_checkpoint import split_state

    mean = ReplicaMean()
    for holder, address in holders:
        try:
            header, blob = await client.fetch_state(address)
            tensors = load(blob)
            if attested.ahead(header.position):
                attested = AttestedDigests.of_stage(await asyncio.to_thread(reread), index)
            refusal = attested.refusal(header.position, tensors)
            if refusal:
                raise ValueError(refusal)
            if attested.unchecked(header.position) and attested.by_position:
                print(f"gptjt export: warning: stage {index}'s state from {holder} (after {header.position} steps) "
                      "is taken unchecked: its layer range changed at a re-plan after that step closed, and no "
                      "member has reported a digest of the new range yet", file=sys.stderr)
            mean.add(split_state(tensors)[0], holder)  # weights only
        except Exception as e:  # a replica's failure, whatever it is, leaves the others to export
            skipped.append(f"{holder} ({address}): {e}")
            continue
        positions[holder] = header.position
    if not mean.count:
        raise RuntimeError(f"no replica of stage {index} sent its weights: {'; '.join(skipped)}")
    return mean.mean()


def operator_link_credentials(address: str, admin_token: str, tls_ca: str = ""):
    """Mutual-TLS credentials for the operator's tools on stage links: a fresh key, and a certificate
    the coordinator (the run's CA) signs for it once the admin token checks out."""
    import grpc

    from gptjt_core.pki import new_key_pem, public_key_pem
    from gptjt_proto import operator_pb2 as opb
    from gptjt_proto import operator_pb2_grpc as opb_grpc

    if not admin_token:
        raise BadArgument("this run's stage links are mutual TLS: exporting from the swarm needs the admin token "
                          "(--admin-token or $GPTJT_ADMIN_TOKEN) for a certificate the workers accept")
    key = new_key_pem()
    with open_channel(address, tls_ca) as channel:
        try:
            reply = opb_grpc.OperatorStub(channel).OperatorCertificate(opb.OperatorCertificateRequest(
                admin_token=admin_token, public_key_pem=public_key_pem(key).decode()), timeout=30)
        except grpc.RpcError as e:
            raise_for(e, address, "OperatorCertificate")
    return grpc.ssl_channel_credentials(root_certificates=reply.ca_pem.encode(), private_key=key,
                                        certificate_chain=reply.cert_pem.encode())


def export_from_swarm(address: str, out: str, dtype: str = "fp32", admin_token: str = "", read_token: str = "") -> str:
    """Gather every stage's weights from its members, averaged (export_holders), and write a HF
    checkpoint (the admin token buys the certificate that TLS stage links need; either token reads
    the status where that needs one). A member that fails is left out with a warning on stderr."""
    import torch

    from gptjt_core.export import export_checkpoint
    from gptjt_core.model import model_config_for
    from gptjt_core.tokenizer import load_tokenizer

    status = fetch_status(address, read_token=read_token, admin_token=admin_token)
    credentials = operator_link_credentials(address, admin_token) if status.get("stage_link_tls") else None
    skipped: list[str] = []
    reread = lambda: fetch_status(address, read_token=read_token, admin_token=admin_token)  # noqa: E731
    states = asyncio.run(_fetch_all_stages(status, credentials, skipped, reread))
    for reason in skipped:
        print(f"warning: left out of the export (the other replicas of its stage are in it): {reason}",
              file=sys.stderr)
    run_source = status["model_source"]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    path = export_checkpoint(states, model_config_for(run_source), out,
                             tokenizer=load_tokenizer(status["tokenizer"]), dtype=dtypes[dtype])
    return str(path)


def export_from_store(store_root: str, out: str, step: int | None = None, source: str = "random:tiny:0",
                      tokenizer: str = "gpt2-offline", dtype: str = "fp32", anchor: bool = False) -> str:
    """A HF checkpoint from the checkpoint store (the newest complete step unless `step` is given).
    anchor: of a local-steps run, the replicas' shared model at the last outer step (the stored
    outer state) instead of the checkpoint writer's own weights (store_weights)."""
    import torch

    from coordinator.checkpoint_store import CheckpointStore
    from gptjt_core.export import export_checkpoint
    from gptjt_core.model import StageSpec, model_config_for
    from gptjt_core.tokenizer import load_tokenizer

    config = model_config_for(source)
    store = CheckpointStore(store_root)
    if step is None:
        step = store.latest_complete(config.n_layer)
        if step is None:
            raise FileNotFoundError(f"the store {store_root} holds no complete checkpoint (steps: {store.steps()})")
    whole = StageSpec(0, config.n_layer, embed=True, head=True)
    weights = store_weights(store.get(step, whole, config.n_layer), step, anchor)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return str(export_checkpoint([weights], config, out, tokenizer=load_tokenizer(tokenizer), dtype=dtypes[dtype]))


def store_weights(tensors: dict, step: int, anchor: bool) -> dict:
    """The weights to export from a stored checkpoint of `step`. A local-steps run's checkpoint
    holds one replica's weights, its writer's, which drift from the other replicas' between
    outer steps, and the anchor they share: with `anchor`, the parameters are the anchor's (the
    buffers stay), else a warning on stderr says what the export holds and what else there is."""
    from gptjt_core.stage_checkpoint import outer_state, split_state

    weights, _ = split_state(tensors)
    shared = outer_state(tensors).get("anchor")
    if anchor and not shared:
        raise ValueError(f"the checkpoint of step {step} holds no anchor: it is not of a local-steps run "
                         "(averaging.mode); export it without --anchor")
    if anchor:
        missing = sorted(set(shared) - set(weights))
        if missing:
            raise ValueError(f"the checkpoint of step {step} has an anchor for tensors it holds no weights of, "
                             f"e.g. {missing[:3]}: the file is damaged")
        return {**weights, **{n: t.to(weights[n].dtype) for n, t in shared.items()}}
    if shared:
        print(f"warning: the checkpoint of step {step} is of a local-steps run: its weights are one replica's "
              "(the checkpoint writer's), which drift from the others' between outer steps. --anchor exports "
              "the model the replicas shared at the last outer step instead; `gptjt export --coordinator` "
              "exports the replicas' mean while the swarm is up.", file=sys.stderr)
    return weights


def register(sub: argparse._SubParsersAction) -> None:
    from . import operator_commands

    operator_commands.register(sub)
