"""A LangChain chain instrumented by OpenInference, exporting OTLP/HTTP with gzip.

No flywheel code in this process: ``python langchain_agent.py ENDPOINT KEY LLM_URL QUESTION...``
runs a prompt | ChatOpenAI | parser chain (the model OpenAI-protocol at LLM_URL) per
question, prints each answer on a line, and flushes the exporter before it exits.
"""

from __future__ import annotations

import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from openinference.instrumentation.langchain import LangChainInstrumentor
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

if __name__ == "__main__":
    endpoint, key, llm_url, *questions = sys.argv[1:]
    resource = Resource.create({"service.name": "lc-app", "flywheel.workflow": "lc-qa"})
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(
        endpoint=endpoint, headers={"X-API-Key": key}, compression=Compression.Gzip
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    LangChainInstrumentor().instrument(tracer_provider=provider)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer briefly."), ("human", "{question}")]
    )
    llm = ChatOpenAI(model="gpt-lc", base_url=llm_url, api_key="sk-test", max_retries=0)
    chain = prompt | llm | StrOutputParser()
    for question in questions:
        print(chain.invoke({"question": question}), flush=True)
    provider.shutdown()
