"""Router logic with in-process fake replicas: exactly-once delivery across a replica failure,
placement by outstanding tokens, admission control. (The same paths run against real Ray
actors in test_service.py; here the failure point is exact.)"""

import asyncio
import time

import pytest

pytest.importorskip("ray")
from ray.exceptions import ActorDiedError  # noqa: E402

from rollout.params import SamplingParams  # noqa: E402
from rollout.service.metrics import FrontendMetrics  # noqa: E402
from rollout.service.messages import Finished, RequestDone, Started  # noqa: E402
from rollout.service.router import QueueFullError, Routed, Router  # noqa: E402


def done(value):
    f = asyncio.get_running_loop().create_future()
    f.set_result(value)
    return f


class FakeMethod:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeReplica:
    """Generates one record per (prompt, sample); dies after `die_after` records if set."""

    def __init__(self, die_after=None):
        self.die_after, self.calls = die_after, []
        self.generate = FakeMethod(self._generate)
        self.status = FakeMethod(lambda: done(dict(weight_version=0, ready=True)))
        self.abort = FakeMethod(lambda request_id: None)

    def _generate(self, request_id, prompts, params, expected_version, timeout, rows=None, stream_tokens=False):
        self.calls.append((prompts, params, rows))
        rows = rows or [(i, list(range(params["n"]))) for i in range(len(prompts))]
        records = [Started(0.0, 0)]
        records += [Finished([dict(prompt_index=i, sample_index=j, token_ids=[p[0], j], seed=params["seed"])])
                    for p, (i, samples) in zip(prompts, rows) for j in samples]
        records.append(RequestDone(1.0))
        die_after = self.die_after

        async def stream():
            for k, r in enumerate(records):
                if die_after is not None and k > die_after:
                    raise ActorDiedError()
                yield done(r)
        return stream()


async def collect(router, prompts, params):
    return [e.record async for e in router.generate(prompts, params) if isinstance(e, Routed)]


def test_a_replica_dying_mid_batch_loses_and_duplicates_nothing():
    async def run():
        router = Router(FrontendMetrics(None))
        dying, healthy = FakeReplica(die_after=3), FakeReplica()
        router.add_replica(dying, "dying")
        router.add_replica(healthy, "healthy")
        router._placements = -1  # the first placement goes to "dying"
        router.replicas[1].outstanding_tokens = 1000  # and not to the prompts' home ("healthy") either
        prompts = [[10], [20], [30]]
        got = await collect(router, prompts, SamplingParams(max_tokens=4, n=2, seed=5))
        return got, dying, healthy
    got, dying, healthy = asyncio.run(run())
    keys = sorted((r["prompt_index"], r["sample_index"]) for r in got)
    assert keys == [(i, j) for i in range(3) for j in range(2)]  # every sample once
    # The dying replica streamed prompt 0's two samples and prompt 1's first; the rest is
    # re-dispatched to the other replica, grouped by how many samples each prompt still lacks.
    assert len(dying.calls) == 1
    assert sorted((p, params["n"]) for p, params, _ in healthy.calls) == [([[20]], 1), ([[30]], 2)]
    # Re-dispatched rows carry the caller's prompt and sample indices and the request's seed:
    # together they key each row's randomness (the row draws what the one it replaces would have).
    assert sorted(rows for _, _, rows in healthy.calls) == [[(1, [1])], [(2, [0, 1])]]
    assert all(params["seed"] == 5 for _, params, _ in healthy.calls)
    for r in got:
        assert r["token_ids"] == [[10, 20, 30][r["prompt_index"]], r["sample_index"]]


def test_requests_go_to_the_replica_with_fewest_outstanding_tokens():
    async def run():
        router = Router(FrontendMetrics(None))
        a, b = FakeReplica(), FakeReplica()
        router.add_replica(a, "a")
        router.add_replica(b, "b")
        router.replicas[0].outstanding_tokens = 1000
        await collect(router, [[1]], SamplingParams(max_tokens=2))
        return a, b
    a, b = asyncio.run(run())
    assert (len(a.calls), len(b.calls)) == (0, 1)


def test_admission_beyond_the_queue_is_refused():
    async def run():
        router = Router(FrontendMetrics(None), max_queue=0)
        router.add_replica(FakeReplica(), "a")
        router.admitted = 1  # one request running, none may wait
        with pytest.raises(QueueFullError, match="queue full"):
            await collect(router, [[1]], SamplingParams(max_tokens=2))
    asyncio.run(run())


def test_one_replica_death_counts_once_however_many_requests_it_failed():
    async def run():
        router = Router(FrontendMetrics(None))
        dying, healthy = FakeReplica(die_after=1), FakeReplica()
        router.add_replica(dying, "dying")
        router.add_replica(healthy, "healthy")
        router.replicas[1].outstanding_tokens = 10 ** 9  # both requests start on "dying"
        await asyncio.gather(collect(router, [[1]], SamplingParams(max_tokens=2, n=2)),
                             collect(router, [[2]], SamplingParams(max_tokens=2, n=2)))
        return router
    router = asyncio.run(run())
    assert len(router.replicas[0].actor.calls) == 2 and router.replicas[0].failures == 1


def test_a_replica_on_older_weights_is_not_ready():
    async def run(version):
        router = Router(FrontendMetrics(None))
        router.add_replica(FakeReplica(), "restarted")  # answers ready, weight_version 0
        router.version = version
        return (await router.replica_status())[0]["ready"]
    assert asyncio.run(run(0)) is True and asyncio.run(run(3)) is False


def test_a_push_goes_on_without_a_restarting_replica_which_catches_up_later():
    from ray.exceptions import ActorUnavailableError

    class Staging(FakeReplica):
        def __init__(self, restarting=False):
            super().__init__()
            self.restarting, self.committed = restarting, []
            self.stage_weights = FakeMethod(self._stage)
            self.commit_weights = FakeMethod(lambda v, mode: done(self.committed.append(v) or v))
            self.discard_weights = FakeMethod(lambda: done(None))

        def _stage(self, version, ref):
            async def run():
                if self.restarting:
                    raise ActorUnavailableError("restarting", None)
                return 0
            return run()

    async def run():
        router = Router(FrontendMetrics(None))
        live, restarting = Staging(), Staging(restarting=True)
        router.add_replica(live, "live")
        router.add_replica(restarting, "restarting")
        version = await router._two_phase_push(lambda r, v: r.actor.stage_weights.remote(v, None), None, "wait",
                                               catch_up="ref", source="push")
        return router, version, live, restarting
    router, version, live, restarting = asyncio.run(run())
    assert version == 1 and router.version == 1 and live.committed == [1] and restarting.committed == []
    assert [r.version for r in router.replicas] == [1, None]  # the restarted one loads v1 before serving


def test_requests_waiting_for_a_policy_version_count_against_the_queue():
    async def run():
        router = Router(FrontendMetrics(None), max_queue=0)
        router.add_replica(FakeReplica(), "a")
        router.admitted = 1  # one request in flight, none may wait
        with pytest.raises(QueueFullError, match="queue full"):
            await router.wait_for_version(5, time.monotonic() + 60)
        assert router.admitted == 1
        await router.wait_for_version(0, time.monotonic() + 60)  # already served: no place needed
    asyncio.run(run())


def test_a_catch_up_waits_for_a_running_push_instead_of_racing_it():
    """A request that finds its replica behind loads the current weights under the push lock: a
    push that stages on the replica meanwhile used to discard the catch-up's staged weights and
    fail the request ("staged weights for version N were discarded"). Waiting for the lock is
    bounded by the request's deadline."""
    from rollout.service.router import DeadlineExceededError

    class Behind(FakeReplica):
        def __init__(self):
            super().__init__()
            self.loads = []
            self.status = FakeMethod(lambda: done(dict(weight_version=self.served, ready=True)))
            self.load_weights = FakeMethod(lambda v, ref: done(self.loads.append(v) or v))
            self.served = 0

    async def run():
        router = Router(FrontendMetrics(None))
        replica = Behind()
        router.add_replica(replica, "behind")
        router.version, router.weights_ref = 1, "ref-v1"
        router.replicas[0].version = None           # restarted: must catch up before work
        await router._push_lock.acquire()           # a push (to version 2) is running
        request = asyncio.create_task(collect(router, [[5]], SamplingParams(n=1, seed=0)))
        await asyncio.sleep(0.05)
        assert not request.done() and replica.loads == []  # no catch-up while the push runs
        replica.served = router.version = 2           # the push caught this replica up too
        router.replicas[0].version = 2
        router._push_lock.release()
        records = await asyncio.wait_for(request, 5)
        assert len(records) == 1 and replica.loads == []  # nothing left to load

        router.replicas[0].version = None
        await router._push_lock.acquire()
        with pytest.raises(DeadlineExceededError, match="weight update"):
            await collect_by(router, time.monotonic() + 0.1)
        router._push_lock.release()
        assert not router._push_lock.locked()

    async def collect_by(router, deadline):
        return [e async for e in router.generate([[5]], SamplingParams(n=1, seed=0), deadline)]
    asyncio.run(run())


def test_a_replica_behind_catches_up_without_any_request_and_reports_rays_restart_count():
    """The supervisor's check finds a replica Ray restarted on the base weights while the router
    serves version 1 (its slot still believes version 1: it died idle, no request saw it) and
    loads version 1 onto it at once; GetStatus shows catching_up during the load, then ready,
    and the replica's own count of Ray restarts."""
    class Restarted(FakeReplica):
        def __init__(self):
            super().__init__()
            self.served, self.loads, self.release = 0, [], asyncio.Event()
            self.status = FakeMethod(lambda: done(dict(weight_version=self.served, ready=True, restarts=2)))
            self.load_weights = FakeMethod(self._load)

        def _load(self, version, ref):
            async def run():
                await self.release.wait()
                self.loads.append((version, ref))
                self.served = version
                return version
            return run()

    async def run():
        metrics = FrontendMetrics(None)
        router = Router(metrics)
        replica = Restarted()
        router.add_replica(replica, "r")
        router.version, router.weights_ref = 1, "ref-v1"
        router.replicas[0].version = 1
        check = asyncio.create_task(router.check_replicas())
        while not router.replicas[0].catching_up:
            await asyncio.sleep(0.01)
        during = (await router.replica_status())[0]
        replica.release.set()
        await asyncio.wait_for(check, 5)
        after = (await router.replica_status())[0]
        return replica, during, after, metrics
    replica, during, after, metrics = asyncio.run(run())
    assert replica.loads == [(1, "ref-v1")]
    assert during["catching_up"] and not during["ready"]
    assert after["ready"] and not after["catching_up"] and after["weight_version"] == 1 and after["restarts"] == 2
    assert metrics.catch_ups._value.get() == 1 and metrics.ready_replicas._value.get() == 1


def test_a_replica_that_restarted_during_a_pause_is_paused_again_for_the_time_left():
    class Unpaused(FakeReplica):
        def __init__(self):
            super().__init__()
            self.pauses = []
            self.status = FakeMethod(lambda: done(dict(weight_version=0, ready=True, paused=not not self.pauses)))
            self.pause = FakeMethod(lambda mode, timeout: done(self.pauses.append((mode, timeout)) or 0))

    async def run():
        router = Router(FrontendMetrics(None))
        replica = Unpaused()
        router.add_replica(replica, "r")
        router.paused_until = time.monotonic() + 100
        await router.check_replicas()
        await router.check_replicas()  # paused now: nothing more to do
        router.paused_until = None
        return replica
    replica = asyncio.run(run())
    assert len(replica.pauses) == 1 and replica.pauses[0][0] == "keep" and 90 < replica.pauses[0][1] <= 100


def test_a_catch_up_whose_object_store_copy_was_lost_copies_a_live_replica_instead():
    """The two-node case: the whole push's object-store copy can be lost with a node; the
    restarted replica then loads a live replica's weights instead of failing every check."""
    from ray.exceptions import ObjectLostError

    class Behind(FakeReplica):
        def __init__(self, served):
            super().__init__()
            self.served, self.loads = served, []
            self.status = FakeMethod(lambda: done(dict(weight_version=self.served, ready=True)))
            self.export_weights = FakeMethod(lambda: "exported-v1")
            self.load_weights = FakeMethod(self._load)

        def _load(self, version, ref):
            async def run():
                if ref == "lost-v1":
                    raise ObjectLostError("ab" * 14, None, "")
                self.loads.append(ref)
                self.served = version
                return version
            return run()

    async def run():
        router = Router(FrontendMetrics(None))
        live, restarted = Behind(1), Behind(0)
        router.add_replica(live, "live")
        router.add_replica(restarted, "restarted")
        router.version, router.weights_ref = 1, "lost-v1"
        router.replicas[0].version = 1
        await router.check_replicas()
        return restarted, router
    restarted, router = asyncio.run(run())
    assert restarted.loads == ["exported-v1"] and router.replicas[1].version == 1


def test_prompts_go_back_to_their_home_replica_while_it_costs_no_balance():
    """Affinity: the replica that rolled a request's prompts out before holds their history
    drafts; the same prompts go there again unless it carries more than the request's cost (or
    a quarter of the mean load) above the least loaded replica."""
    router = Router(FrontendMetrics(None))
    for name in "abcd":
        router.add_replica(FakeReplica(), name)
    prompts = [[5, 6, 7], [8, 9]]
    homes = {router._pick(prompts=prompts, cost=100).name for _ in range(8)}
    assert len(homes) == 1  # the same prompts, the same replica, while the ties rotate
    others = {router._pick(prompts=[[p]], cost=100).name for p in range(40)}
    assert len(others) == 4  # other prompts spread over every replica
    home = next(r for r in router.replicas if r.name in homes)
    home.outstanding_tokens = 100  # within the request's own cost: still home
    assert router._pick(prompts=prompts, cost=100) is home
    home.outstanding_tokens = 101  # more would unbalance the replicas: the least loaded instead
    assert router._pick(prompts=prompts, cost=100) is not home
    for r in router.replicas:
        r.outstanding_tokens += 1000  # under load the slack is a quarter of the mean
    assert router._pick(prompts=prompts, cost=100) is home
    assert router._pick(prompts=prompts, cost=100, avoid={home.name}) is not home  # failed: never a home


def test_a_home_replica_dying_mid_request_re_dispatches_its_samples_elsewhere():
    async def run():
        router = Router(FrontendMetrics(None))
        router.add_replica(FakeReplica(), "x")
        router.add_replica(FakeReplica(), "y")
        prompts = [[10], [20], [30]]
        home = router._pick(prompts=prompts, cost=1)
        home.actor.die_after = 3
        got = await collect(router, prompts, SamplingParams(max_tokens=4, n=2, seed=5))
        return got, home, next(r for r in router.replicas if r is not home)
    got, home, other = asyncio.run(run())
    assert sorted((r["prompt_index"], r["sample_index"]) for r in got) == [(i, j) for i in range(3) for j in range(2)]
    assert len(home.actor.calls) == 1 and other.actor.calls and home.failures == 1


def test_a_stopped_front_end_closes_its_shared_segments():
    """The gRPC front end's kept segment (and the one a catch-up would read) are closed at
    shutdown: the memory goes then, not whenever the garbage collector reaches the stopped
    server's objects (a cycle through the servicer and the gRPC server kept one alive)."""
    from rollout.service.shared_weights import ReceiveSegment

    def mapped() -> int:
        with open("/proc/self/maps") as f:
            return sum("memfd:rollout-weights" in line for line in f)

    before = mapped()
    router = Router(FrontendMetrics(None))
    kept, served = ReceiveSegment({"w": (64, 64)}, 2), ReceiveSegment({"w": (64, 64)}, 2)
    router.keep_segment(kept)
    router.weights_ref = served
    assert mapped() == before + 2
    router.close_segments()
    assert kept.fd == served.fd == -1 and router.weights_ref is None
    assert mapped() == before
    assert asyncio.run(router.claim_segment(time.monotonic() + 1)) is None
