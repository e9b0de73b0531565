"""Level 4: typed error handling, retries, a custom base URL, and results for another tool.

    uv run python examples/advanced_batch.py [--base-url https://proxy.example/gemini/v1beta]

One request is invalid on purpose (4k needs 8 seconds) and one is refused by the (simulated)
safety filter, to show how each failure arrives. Results go to results.json for other tools.
"""

import argparse
import asyncio
import json
from pathlib import Path

from reeldrop import (
    APIError,
    DownloadError,
    GenerationTimeout,
    ValidationError,
    VeoVideoGenerator,
    VideoGenerationError,
    VideoRequest,
    VideoResponse,
)
from reeldrop.simulator_hosting import service_or_simulator

REQUESTS = [
    VideoRequest(prompt="A lighthouse at dusk, waves breaking", output="lighthouse"),
    VideoRequest(prompt="City skyline at night", resolution="4k", duration_seconds=4,
                 output="skyline"),
    VideoRequest(prompt="A scene the filter refuses [filtered]", output="refused"),
]


def explain(response: VideoResponse) -> str:
    try:
        return f"ok: {response.raise_for_error()}"
    except ValidationError as e:
        return f"not sent, fix the request: {e}"
    except APIError as e:
        return f"service said {e.status} (retryable={e.retryable}): {e}"
    except GenerationTimeout as e:
        return f"timed out: {e}"
    except DownloadError as e:
        return f"download failed: {e}"
    except VideoGenerationError as e:
        return f"{type(e).__name__}: {e}"


async def generate_all(settings: dict[str, object], out: Path) -> list[VideoResponse]:
    # Retries and timeouts are named settings: 5 create tries, 20 minutes per operation.
    async with VeoVideoGenerator(create_tries=5, download_tries=5, poll_deadline_s=1200,
                                 **settings) as gen:
        return await asyncio.gather(*(
            gen.generate_video_async(r, out / f"{r.output}.mp4") for r in REQUESTS))


def main(settings: dict[str, object]) -> None:
    out = Path("advanced_videos")
    out.mkdir(exist_ok=True)
    responses = asyncio.run(generate_all(settings, out))
    report = []
    for request, response in zip(REQUESTS, responses, strict=True):
        print(f"{request.output:12} {explain(response)}")
        report.append({"output": request.output, "success": response.success,
                       "video": str(response.video_path) if response.video_path else None,
                       "operation": response.operation, "error": response.error})
    Path("results.json").write_text(json.dumps(report, indent=2) + "\n")
    print("wrote results.json")


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
parser.add_argument("--base-url", help="a proxy of the Gemini API (…/v1beta)")
args = parser.parse_args()
with service_or_simulator() as settings:
    if args.base_url:
        settings["base_url"] = args.base_url
    main(settings)
