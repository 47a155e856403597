"""schemathesis fuzzes the served /openapi.json against a real colocated cluster (started
once for the module): every generated request, valid or not, gets an answer that is no
5xx, every 4xx carries the OpenAI error shape, and afterwards the cluster still serves a
normal request and every block came back. `[api] max_tokens = 8` keeps the valid
generations short (the document states the bound, so the generator honours it)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import pytest_asyncio
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from services.launcher.supervisor import Cluster
from tests.api.cluster import (
    API_KEY,
    assert_error_shape,
    cluster_settings,
    until_gateway_idle,
    until_ready,
)
from tests.cluster_requests import all_idle_and_intact

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")  # the cluster's loop
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    tmp = tmp_path_factory.mktemp("api-fuzz")
    shape = cluster_settings(tmp, {"mode": "colocated"}, api={"max_tokens": 8})
    async with Cluster(shape) as c:
        assert c.http is not None
        await until_ready(c.http)
        yield c


def test_no_5xx_and_openai_errors(cluster: Cluster) -> None:
    """Each operation: up to 50 valid requests, and for those with a body up to 50 invalid
    ones (schemathesis's positive and negative modes). Driven through hypothesis directly (schemathesis's pytest plugin
    does not run under this pytest)."""
    schema = schemathesis.openapi.from_url(f"{cluster.http}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7
    for operation in operations:
        # A GET without parameters has nothing to make invalid.
        post = operation.method.lower() == "post"
        modes = (
            (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            if post
            else (GenerationMode.POSITIVE,)
        )
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=20,
                deadline=None,
                database=None,
                derandomize=True,  # the same cases every run: CI stays reproducible
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                response = case.call(headers=AUTH, timeout=30)
                where = f"{case.method} {case.path}"
                assert response.status_code < 500, f"{where}: {response.text[:500]}"
                if 400 <= response.status_code < 500:
                    assert_error_shape(json.loads(response.content))

            check()


@MODULE_LOOP
async def test_the_cluster_serves_after_the_fuzz(cluster: Cluster) -> None:
    await until_gateway_idle(cluster)
    await all_idle_and_intact(cluster)
    client = openai.AsyncOpenAI(base_url=f"{cluster.http}/v1", api_key=API_KEY, max_retries=0)
    done = await client.completions.create(model="tiny", prompt="after the fuzz", max_tokens=4)
    assert done.usage is not None and done.usage.completion_tokens >= 1
