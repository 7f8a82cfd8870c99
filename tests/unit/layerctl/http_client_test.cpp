// tools/common/http_client: request building, incremental response parsing (Content-Length,
// chunked, close-delimited, pipelined, split at every byte) and the blocking unix-socket client
// against a real socket served by a scripted server.
#include "http_client.hpp"

#include <gtest/gtest.h>

#include <string>

#include "script_server.hpp"

using namespace layerd::tools;
using layerd::tools::testing::http_answer;
using layerd::tools::testing::ScriptedAnswer;
using layerd::tools::testing::ScriptServer;
using layerd::tools::testing::RecordedRequest;

TEST(RequestBuilding, PluginRequestMatchesDockerd) {
  HttpRequest r = plugin_request("Create", layer_args("abc", "def"));
  EXPECT_EQ(r.method, "POST");
  EXPECT_EQ(r.target, "/GraphDriver.Create");
  EXPECT_EQ(r.body, "{\"ID\":\"abc\",\"Parent\":\"def\"}\n");
  // Go's omitempty: no Parent key for a base layer, "{}" for calls without arguments.
  EXPECT_EQ(plugin_request("Get", layer_args("abc")).body, "{\"ID\":\"abc\"}\n");
  EXPECT_EQ(plugin_request("Status", nlohmann::json::object()).body, "{}\n");
}

TEST(RequestBuilding, HeadHasDockerdHeadersAndLength) {
  HttpRequest r = plugin_request("Exists", layer_args("x"));
  std::string head = serialize_head(r);
  EXPECT_EQ(head.rfind("POST /GraphDriver.Exists HTTP/1.1\r\n", 0), 0u);
  EXPECT_NE(head.find("\r\nHost: \r\n"), std::string::npos);
  EXPECT_NE(head.find("Accept: application/vnd.docker.plugins.v1.2+json\r\n"), std::string::npos);
  EXPECT_NE(head.find("Content-Length: 11\r\n"), std::string::npos);
  EXPECT_EQ(head.substr(head.size() - 4), "\r\n\r\n");
  EXPECT_EQ(serialize(r), head + r.body);
}

TEST(RequestBuilding, ChunkedHeadAndChunks) {
  HttpRequest r;
  r.target = apply_diff_target("id 1", "");
  r.chunked = true;
  r.body = "ignored";
  std::string head = serialize_head(r);
  EXPECT_NE(head.find("Transfer-Encoding: chunked\r\n"), std::string::npos);
  EXPECT_EQ(head.find("Content-Length"), std::string::npos);
  EXPECT_EQ(serialize(r), head);
  EXPECT_EQ(r.target, "/GraphDriver.ApplyDiff?id=id%201&parent=");
  EXPECT_EQ(encode_chunk("hello world, 26 characters"), "1a\r\nhello world, 26 characters\r\n");
  EXPECT_EQ(encode_chunk(""), "");
  EXPECT_EQ(kLastChunk, "0\r\n\r\n");
}

TEST(RequestBuilding, UrlEncode) {
  EXPECT_EQ(url_encode("aZ09-_.~"), "aZ09-_.~");
  EXPECT_EQ(url_encode("a&b=c/d?%"), "a%26b%3Dc%2Fd%3F%25");
}

TEST(ResponseParser, ContentLength) {
  ResponseParser p;
  std::string raw = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"Exists\":true}";
  EXPECT_EQ(p.feed(raw), raw.size());
  ASSERT_TRUE(p.complete());
  EXPECT_EQ(p.status(), 200);
  EXPECT_EQ(p.body(), "{\"Exists\":true}");
  EXPECT_EQ(find_header(p.headers(), "content-type"), "application/json");
  EXPECT_TRUE(p.keep_alive());
}

TEST(ResponseParser, ChunkedSplitAtEveryByte) {
  std::string raw =
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Long-Header-Name: some value\r\n\r\n"
      "5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n";
  for (std::size_t split = 1; split < raw.size(); ++split) {
    ResponseParser p;
    std::size_t used = p.feed(std::string_view(raw).substr(0, split));
    EXPECT_EQ(used, split);
    used = p.feed(std::string_view(raw).substr(split));
    EXPECT_EQ(used, raw.size() - split) << split;
    ASSERT_TRUE(p.complete()) << split;
    EXPECT_EQ(p.body(), "hello world") << split;
    EXPECT_EQ(find_header(p.headers(), "X-Long-Header-Name"), "some value") << split;
  }
  // One byte at a time, streamed to a sink.
  ResponseParser p;
  std::string streamed;
  p.on_headers([&](ResponseParser& r) {
    EXPECT_EQ(r.status(), 200);
    r.stream_body_to([&](std::string_view b) { streamed.append(b); });
  });
  for (char c : raw) EXPECT_EQ(p.feed(std::string_view(&c, 1)), 1u);
  EXPECT_TRUE(p.complete());
  EXPECT_EQ(streamed, "hello world");
  EXPECT_TRUE(p.body().empty());
  EXPECT_EQ(p.body_bytes(), 11u);
}

TEST(ResponseParser, PipelinedResponsesStopAtTheBoundary) {
  std::string first = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
  std::string second = "HTTP/1.1 500 Internal\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
  std::string both = first + second;
  ResponseParser p;
  std::size_t used = p.feed(both);
  EXPECT_EQ(used, first.size());
  EXPECT_TRUE(p.complete());
  EXPECT_EQ(p.body(), "{}");
  p.reset();
  EXPECT_EQ(p.feed(std::string_view(both).substr(used)), second.size());
  EXPECT_TRUE(p.complete());
  EXPECT_EQ(p.status(), 500);
  EXPECT_EQ(p.body(), "abc");
}

TEST(ResponseParser, CloseDelimitedBody) {
  ResponseParser p;
  p.feed("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nline 1\nline 2\n");
  EXPECT_FALSE(p.complete());
  p.finish();
  EXPECT_TRUE(p.complete());
  EXPECT_FALSE(p.keep_alive());
  EXPECT_EQ(p.body(), "line 1\nline 2\n");
}

TEST(ResponseParser, TruncatedAndMalformed) {
  {
    ResponseParser p;
    p.feed("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
    try {
      p.finish();
      FAIL() << "a cut body must throw";
    } catch (const HttpError& e) {
      EXPECT_EQ(e.kind(), HttpErrorKind::kClosed);
    }
  }
  {
    ResponseParser p;
    EXPECT_THROW(p.finish(), HttpError);
  }
  {
    ResponseParser p;
    try {
      p.feed("NOT-HTTP garbage\r\n\r\n");
      FAIL() << "garbage must throw";
    } catch (const HttpError& e) {
      EXPECT_EQ(e.kind(), HttpErrorKind::kProtocol);
    }
  }
  {
    ResponseParser p;
    EXPECT_THROW(p.feed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), HttpError);
  }
  {
    // The buffered body limit.
    ResponseParser p(4);
    EXPECT_THROW(p.feed("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n12345"), HttpError);
  }
}

TEST(UnixHttpClient, KeepAliveRequestsShareAConnection) {
  ScriptServer server([](const RecordedRequest& r) {
    return ScriptedAnswer{http_answer(200, "{\"Echo\":" + nlohmann::json(r.url).dump() + "}")};
  });
  UnixHttpClient client(server.path());
  for (int i = 0; i < 5; ++i) {
    HttpResponse response = client.request(plugin_request("Exists", layer_args(std::to_string(i))));
    EXPECT_EQ(response.status, 200);
    EXPECT_EQ(response.body, "{\"Echo\":\"/GraphDriver.Exists\"}");
  }
  auto requests = server.requests();
  ASSERT_EQ(requests.size(), 5u);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(requests[i].connection, 0);
    EXPECT_EQ(requests[i].method, "POST");
    EXPECT_EQ(requests[i].body, "{\"ID\":\"" + std::to_string(i) + "\"}\n");
  }
}

TEST(UnixHttpClient, ReconnectsWhenTheServerClosedAnIdleConnection) {
  ScriptServer server([](const RecordedRequest&) {
    return ScriptedAnswer{http_answer(200, "{}"), /*close=*/true};
  });
  UnixHttpClient client(server.path());
  EXPECT_EQ(client.request(plugin_request("Status", nlohmann::json::object())).status, 200);
  EXPECT_EQ(client.request(plugin_request("Status", nlohmann::json::object())).status, 200);
  EXPECT_EQ(server.requests().size(), 2u);
  EXPECT_EQ(server.connections(), 2);
}

TEST(UnixHttpClient, ChunkedUploadArrivesIntact) {
  ScriptServer server([](const RecordedRequest& r) {
    return ScriptedAnswer{http_answer(200, "{\"Size\":" + std::to_string(r.body.size()) + "}")};
  });
  std::string payload;
  for (int i = 0; i < 1'000'000; ++i) payload += static_cast<char>('a' + i % 26);
  std::size_t offset = 0;
  BodyReader reader = [&](char* buf, std::size_t size) {
    // Odd-sized reads so chunks of many sizes go out.
    std::size_t n = std::min({size, payload.size() - offset, std::size_t{77'777}});
    std::memcpy(buf, payload.data() + offset, n);
    offset += n;
    return n;
  };
  UnixHttpClient client(server.path());
  ResponseParser parser;
  HttpRequest request;
  request.target = apply_diff_target("L", "P");
  HttpResponse response = client.exchange(request, parser, reader);
  EXPECT_EQ(response.body, "{\"Size\":1000000}");
  auto requests = server.requests();
  ASSERT_EQ(requests.size(), 1u);
  EXPECT_TRUE(requests[0].chunked);
  EXPECT_EQ(requests[0].url, "/GraphDriver.ApplyDiff?id=L&parent=P");
  EXPECT_EQ(requests[0].body, payload);
}

TEST(UnixHttpClient, ErrorKinds) {
  {
    UnixHttpClient client("/nonexistent/layerd.sock");
    try {
      (void)client.request(plugin_request("Status", nlohmann::json::object()));
      FAIL();
    } catch (const HttpError& e) {
      EXPECT_EQ(e.kind(), HttpErrorKind::kConnect);
      EXPECT_NE(std::string(e.what()).find("/nonexistent/layerd.sock"), std::string::npos);
    }
  }
  {
    // A server that never answers: the idle timeout fires.
    ScriptServer server([](const RecordedRequest&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(400));
      return ScriptedAnswer{"", true};
    });
    UnixHttpClient client(server.path(), std::chrono::milliseconds(100));
    try {
      (void)client.request(plugin_request("Status", nlohmann::json::object()));
      FAIL();
    } catch (const HttpError& e) {
      EXPECT_EQ(e.kind(), HttpErrorKind::kTimeout);
    }
  }
  {
    // A server that closes without answering (fresh connection: no retry).
    ScriptServer server([](const RecordedRequest&) { return ScriptedAnswer{"", true}; });
    UnixHttpClient client(server.path());
    try {
      (void)client.request(plugin_request("Status", nlohmann::json::object()));
      FAIL();
    } catch (const HttpError& e) {
      EXPECT_EQ(e.kind(), HttpErrorKind::kClosed);
    }
  }
}
