"""The prefill and decode halves of a disaggregated request, as event streams a front reads.

Prefill half: the prompt runs on this worker as a one-token request (the first
token is sampled here, as SGLang's prefill does); its `Finished` is held back
until the decode half reports that the KV has landed, so the RPC ends only once
the transfer is over, and its KV blocks stay held in the engine until then
(`Request.keep_kv`, freed by `release_kv`). Decode half: meets the prefill at its bootstrap server,
times the transfer with `core.kv_transfer` (prefill deployment, this one, the
link, and the transfers already booked on the prefill worker's egress and this
worker's ingress), waits until the KV lands, then submits the request with its prompt's KV
in place (`Request.kv_transferred`), arriving at that moment: its first token
comes one decode step later, so TTFT = prefill + exposed transfer + first step.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, Protocol

from memorywall.core.deployment import Deployment
from memorywall.core.kv_transfer import (
    KvLink,
    KvTransfer,
    LinkPort,
    TransferWindow,
    kv_link,
    transfer_window,
)
from memorywall.errors import (
    DisaggregationError,
    InvalidRequestError,
    MemorywallError,
    PartnerLostError,
    PartnerTimeoutError,
)
from memorywall.server.engine.api import (
    EngineClient,
    Event,
    EventIteration,
    EventStream,
    FaultRule,
    Finished,
    FinishReason,
    Request,
    TokenGroup,
)
from memorywall.server.pd.bootstrap import (
    BootstrapServer,
    Prefilled,
    Room,
    TransferPlan,
    booking_from_dict,
    port_as_dict,
    read_message,
    write_message,
)
from memorywall.server.pd.config import Bootstrap, DeploymentRef, PdConfig, Role

CONNECT_TIMEOUT_S = 5.0


class TransferObserver(Protocol):
    def on_transfer(self, transfer: KvTransfer) -> None: ...


class PrefillHalf(EventIteration):
    def __init__(
        self,
        inner: EventStream,
        room: Room,
        server: BootstrapServer,
        *,
        arrival_s: float,
        deployment: DeploymentRef,
        engine: EngineClient,
    ) -> None:
        self.request_id = inner.request_id
        self._inner = inner
        self._room = room
        self._server = server
        self._arrival_s = arrival_s
        self._deployment = deployment
        self._engine = engine
        self._over = False

    @property
    def ended(self) -> bool:
        return self._over

    async def next_event(self) -> Event | None:
        if self._over:
            return None
        try:
            event = await self._inner.next_event()
            if isinstance(event, TokenGroup):
                return event
            if event is None or event.reason is FinishReason.ABORT:
                self._abandon("its prefill was aborted")
                self._over = True
                return event
            try:
                plan = await self._hand_off(event)
            finally:
                self._engine.release_kv(self.request_id)  # landed, or no partner to read it
        except BaseException:
            self._abandon("its prefill half ended")
            raise
        self._over = True
        return replace(event, kv_transfer_s=plan.exposed_s, kv_transfer_bytes=plan.bytes)

    async def _hand_off(self, f: Finished) -> TransferPlan:
        room, timeout_s = self._room, self._server.timeout_s
        room.prefilled.set_result(
            Prefilled(
                end_s=self._arrival_s + f.ttft_s,
                prefill_s=f.prefill_s,
                tokens=f.prompt_tokens,
                deployment=self._deployment,
            )
        )
        try:
            plan = await asyncio.wait_for(asyncio.shield(room.plan), timeout_s)
        except TimeoutError:
            raise PartnerTimeoutError(
                f"no decode worker claimed bootstrap room {room.room_id} within {timeout_s:g} s "
                "of its prefill"
            ) from None
        wait_s = max(0.0, plan.end_s - self._engine.now()) + timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(room.landed), wait_s)
        except TimeoutError:
            raise PartnerLostError(
                f"the decode worker of bootstrap room {room.room_id} did not confirm its KV "
                "transfer"
            ) from None
        self._server.discard(room)
        return plan

    def _abandon(self, why: str) -> None:
        room = self._room
        room.fail(PartnerLostError(f"bootstrap room {room.room_id}: {why}"))
        room.gone.set()
        self._server.discard(room)

    def close(self) -> None:
        self._inner.close()
        if not self._over:
            self._over = True
            self._abandon("its prefill half was cancelled")
            self._engine.release_kv(self.request_id)  # if it had finished, nobody will read it


class DecodeHalf(EventIteration):
    def __init__(
        self,
        engine: EngineClient,
        request: Request,
        bootstrap: Bootstrap,
        *,
        arrival_s: float,
        pd: Disaggregation,
        fault: FaultRule | None = None,
    ) -> None:
        self.request_id = request.request_id
        self._engine = engine
        self._request = request
        self._bootstrap = bootstrap
        self._arrival_s = arrival_s
        self._pd = pd
        self._fault = fault  # submitted with the request, once its KV has landed
        self._inner: EventStream | None = None  # the local decode, once the KV has landed
        self._plan: TransferPlan | None = None
        self._closed = False

    @property
    def ended(self) -> bool:
        return self._inner.ended if self._inner is not None else self._closed

    async def next_event(self) -> Event | None:
        if self._inner is None:
            if self._closed:
                return None
            try:
                self._plan = await self._meet()
            except BaseException:
                self._closed = True
                raise
            if self._closed:
                return None  # closed while the KV moved: nothing to decode for
            request = replace(self._request, kv_transferred=True)
            self._inner = self._engine.submit(
                request, arrival_s=self._plan.end_s, fault=self._fault
            )
        event = await self._inner.next_event()
        plan = self._plan
        assert plan is not None, "set before the local decode starts"
        waited = plan.end_s - self._arrival_s  # the remote prefill and the transfer
        if isinstance(event, TokenGroup):
            return replace(event, times_s=tuple(t + waited for t in event.times_s))
        if isinstance(event, Finished):
            return replace(
                event,
                ttft_s=event.ttft_s + waited,
                e2e_s=event.e2e_s + waited,
                kv_transfer_s=plan.exposed_s,
                kv_transfer_bytes=plan.bytes,
            )
        return event

    async def _meet(self) -> TransferPlan:
        b = self._bootstrap
        where = f"{b.host}:{b.port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(b.host, b.port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as e:
            raise PartnerLostError(
                f"cannot reach the prefill worker's bootstrap server at {where} "
                f"(room {b.room}): {e or 'timed out'}"
            ) from None
        try:
            claimed_s = self._engine.now()
            await write_message(writer, {"room": b.room, "request_id": self.request_id})
            # No limit of its own: the prefill side times out a prefill half that never came
            # and ends the connection when its half ends; the client's deadline bounds the rest.
            answer = await read_message(reader, None)
            if "error" in answer:
                error = PartnerTimeoutError if answer["error"] == "timeout" else PartnerLostError
                raise error(str(answer.get("message", answer["error"])))
            prefilled = Prefilled.from_dict(answer.get("prefill"))
            # The KV moves once both ends are there: from the prefill's end, or, when this
            # half came later, from its claim, with no prefill left to overlap.
            late = claimed_s > prefilled.end_s
            window, link = self._pd.window(
                prefilled, ready_s=max(prefilled.end_s, claimed_s), overlap=not late
            )
            transfer = await self._book(reader, writer, window, link)
            plan = TransferPlan(
                end_s=window.ready_s + transfer.exposed_s,
                time_s=transfer.time_s,
                exposed_s=transfer.exposed_s,
                bytes=transfer.bytes,
            )
            await write_message(writer, {"transfer": plan.as_dict()})
            if await self._eof_before(reader, plan.end_s):
                raise PartnerLostError(
                    f"the prefill worker at {where} went away during the KV transfer of "
                    f"bootstrap room {b.room}"
                )
            await write_message(writer, {"done": True})
        except TimeoutError:
            raise PartnerTimeoutError(
                f"the prefill worker at {where} did not answer for bootstrap room {b.room}"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PartnerLostError(
                f"the prefill worker at {where} went away before the KV transfer of bootstrap "
                f"room {b.room} completed ({e})"
            ) from None
        finally:
            writer.close()
        self._pd.observe(transfer)
        return plan

    async def _book(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        window: TransferWindow,
        link: KvLink,
    ) -> KvTransfer:
        """Have the prefill worker book the transfer on its egress and this worker's
        ingress, held meanwhile so that no other booking on it goes in between."""
        ingress = self._pd.ingress
        async with self._pd.ingress_lock:
            ask = {
                "start_s": window.start_s,
                "size_bytes": window.idle.bytes,
                "send_bytes_per_s": link.send_bytes_per_s,
                "receive_bytes_per_s": link.receive_bytes_per_s,
                "ingress": port_as_dict(ingress),
            }
            await write_message(writer, {"book": ask})
            # The prefill worker answers at once; a bound keeps a hung one from holding
            # this worker's ingress (and every other transfer into it).
            answer = await read_message(reader, self._pd.config.partner_timeout_s)
            if "error" in answer:
                raise PartnerLostError(str(answer.get("message", answer["error"])))
            booking = booking_from_dict(answer["booking"])
            ingress.add(booking)
        return window.timed(booking, link)

    async def _eof_before(self, reader: asyncio.StreamReader, deadline_s: float) -> bool:
        """Wait until `deadline_s` on the engine clock; True if the prefill side hung up first."""
        read = asyncio.ensure_future(reader.read(1))
        wait = asyncio.ensure_future(_sleep_until(self._engine, deadline_s))
        try:
            await asyncio.wait({read, wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (read, wait):
                task.cancel()
        return read.done() and not read.cancelled()

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
        self._closed = True


async def _sleep_until(engine: EngineClient, deadline_s: float) -> None:
    """asyncio rounds timer waits up to whole milliseconds: sleep short of the deadline,
    then yield until it passes."""
    remaining = deadline_s - engine.now()
    if remaining > 0.002:
        await asyncio.sleep(remaining - 0.0015)
    while engine.now() < deadline_s:
        await asyncio.sleep(0)


class Disaggregation:
    """A worker's part in disaggregated serving: requests that carry bootstrap parameters
    become prefill halves (`Role.PREFILL`) or decode halves (`Role.DECODE`)."""

    def __init__(
        self,
        engine: EngineClient,
        deployment: Deployment,
        config: PdConfig,
        *,
        observer: TransferObserver | None = None,
    ) -> None:
        if config.role is Role.BOTH:
            raise ValueError("Disaggregation needs a prefill or decode role")
        self.engine = engine
        self.deployment = deployment
        self.config = config
        self.ref = config.deployment or DeploymentRef.of(deployment)
        self.observer = observer
        self.bootstrap: BootstrapServer | None = None
        self.bootstrap_port: int | None = None
        self._prefill_deployments: dict[DeploymentRef, Deployment] = {}
        # A decode worker's end of the link; one booking on it at a time.
        self.ingress = LinkPort()
        self.ingress_lock = asyncio.Lock()

    @property
    def role(self) -> Role:
        return self.config.role

    async def start(self, host: str) -> None:
        """A prefill worker starts its bootstrap server on `host`."""
        if self.role is Role.PREFILL:
            self.bootstrap = BootstrapServer(timeout_s=self.config.partner_timeout_s)
            self.bootstrap_port = await self.bootstrap.start(host, self.config.bootstrap_port)

    async def stop(self) -> None:
        if self.bootstrap is not None:
            await self.bootstrap.stop()

    def submit(
        self,
        request: Request,
        bootstrap: Bootstrap,
        *,
        arrival_s: float | None = None,
        fault: FaultRule | None = None,
    ) -> EventStream:
        """This worker's half of `request`, arrived at `arrival_s` (default now); raises a
        `MemorywallError`, holding nothing. `fault`: the request's own rule, passed to the
        engine's `submit` with this half."""
        if arrival_s is None:
            arrival_s = self.engine.now()
        if self.role is Role.DECODE:
            return DecodeHalf(
                self.engine, request, bootstrap, arrival_s=arrival_s, pd=self, fault=fault
            )
        if self.bootstrap is None:
            raise DisaggregationError("the prefill worker's bootstrap server is not running")
        if bootstrap.port != self.bootstrap_port:
            raise InvalidRequestError(
                f"disaggregated_params.bootstrap_port {bootstrap.port} is not this prefill "
                f"worker's ({self.bootstrap_port})"
            )
        room = self.bootstrap.attach(bootstrap.room)
        try:
            # The prefill samples the first token (as SGLang's prefill worker does).
            # Its KV is kept once it finishes, until the transfer lands (`PrefillHalf`).
            inner = self.engine.submit(
                replace(request, max_tokens=1, min_tokens=0, keep_kv=True),
                arrival_s=arrival_s,
                fault=fault,
            )
        except MemorywallError:
            self.bootstrap.discard(room)
            raise
        return PrefillHalf(
            inner,
            room,
            self.bootstrap,
            arrival_s=arrival_s,
            deployment=self.ref,
            engine=self.engine,
        )

    def window(
        self, prefilled: Prefilled, *, ready_s: float, overlap: bool = True
    ) -> tuple[TransferWindow, KvLink]:
        """The KV transfer of a prefill that ran on the worker `prefilled` describes, ready to
        leave at `ready_s`, and its link; `overlap`: whether `--kv-layer-overlap` may hide
        part of it behind the prefill."""
        ref = prefilled.deployment
        prefill = self._prefill_deployments.get(ref)
        if prefill is None:  # built once per prefill deployment: it reads profile files
            try:
                prefill = self._prefill_deployments[ref] = ref.build()
            except MemorywallError as e:
                raise DisaggregationError(f"the prefill worker's deployment: {e}") from None
        if prefill.model.name != self.deployment.model.name:
            raise DisaggregationError(
                f"the prefill worker serves {prefill.model.name}, this decode worker "
                f"{self.deployment.model.name}"
            )
        try:
            link = kv_link(prefill, self.deployment, self.config.link)
        except MemorywallError as e:
            raise DisaggregationError(str(e)) from None
        window = transfer_window(
            prefill,
            link,
            prefilled.tokens,
            ready_s=ready_s,
            prefill_s=prefilled.prefill_s,
            layer_overlap=self.config.layer_overlap and overlap,
        )
        return window, link

    def observe(self, transfer: KvTransfer) -> None:
        if self.observer is not None:
            self.observer.on_transfer(transfer)


def disaggregation_for(
    engine: EngineClient, deployment: Deployment, config: PdConfig, registry: Any = None
) -> Disaggregation | None:
    """A prefill or decode worker's `Disaggregation` (None for `Role.BOTH`); a decode worker
    counts its transfers in `registry` (a prometheus_client registry) when given one."""
    if config.role is Role.BOTH:
        return None
    observer = None
    if config.role is Role.DECODE and registry is not None:
        from memorywall.server.pd.metrics import KvTransferMetrics

        observer = KvTransferMetrics(deployment.model.name)
        registry.register(observer)
    return Disaggregation(engine, deployment, config, observer=observer)
