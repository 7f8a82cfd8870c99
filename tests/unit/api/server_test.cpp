// The control socket over a real unix socket: the server runs on a Loop in this thread, clients
// are plain blocking sockets on the loop's worker thread (core::offload).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "layerd/api/server.hpp"
#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/driver/driver.hpp"

namespace layerd::api {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;

// --- blocking client helpers ------------------------------------------------------------------

int connect_to(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  timeval tv{.tv_sec = 10, .tv_usec = 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

bool send_text(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

struct HttpResponse {
  int status = 0;  // 0: no complete response
  std::map<std::string, std::string> headers;  // names in lower case
  std::string body;
  json body_json() const { return json::parse(body, nullptr, false); }
};

// Reads one response (Content-Length or chunked body); keeps extra bytes in `pending`.
class Reader {
 public:
  explicit Reader(int fd) : fd_(fd) {}
  HttpResponse read_response() {
    HttpResponse r;
    std::size_t end;
    while ((end = pending_.find("\r\n\r\n")) == std::string::npos)
      if (!fill()) return r;
    std::string head = pending_.substr(0, end);
    pending_.erase(0, end + 4);
    std::size_t line_end = head.find("\r\n");
    std::string status_line = head.substr(0, line_end);
    if (status_line.rfind("HTTP/1.1 ", 0) != 0) return r;
    int status = std::atoi(status_line.c_str() + 9);
    std::size_t pos = line_end == std::string::npos ? head.size() : line_end + 2;
    while (pos < head.size()) {
      std::size_t next = head.find("\r\n", pos);
      if (next == std::string::npos) next = head.size();
      std::string line = head.substr(pos, next - pos);
      std::size_t colon = line.find(':');
      std::string name = line.substr(0, colon);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      std::string value = colon == std::string::npos ? "" : line.substr(colon + 1);
      while (!value.empty() && value.front() == ' ') value.erase(0, 1);
      r.headers[name] = value;
      pos = next + 2;
    }
    if (status == 100) return read_response();
    if (r.headers.count("content-length")) {
      std::size_t len = std::stoul(r.headers["content-length"]);
      while (pending_.size() < len)
        if (!fill()) return r;
      r.body = pending_.substr(0, len);
      pending_.erase(0, len);
    } else if (r.headers["transfer-encoding"] == "chunked") {
      for (;;) {
        std::size_t le;
        while ((le = pending_.find("\r\n")) == std::string::npos)
          if (!fill()) return r;
        std::size_t size = std::stoul(pending_.substr(0, le), nullptr, 16);
        pending_.erase(0, le + 2);
        while (pending_.size() < size + 2)
          if (!fill()) return r;
        r.body += pending_.substr(0, size);
        pending_.erase(0, size + 2);
        if (size == 0) break;
      }
    }
    r.status = status;
    return r;
  }
  // Reads the head of a streamed answer only.
  int read_status_line() {
    std::size_t end;
    while ((end = pending_.find("\r\n\r\n")) == std::string::npos)
      if (!fill()) return 0;
    int status = std::atoi(pending_.c_str() + 9);
    pending_.erase(0, end + 4);
    return status;
  }
  // True when the server closed the connection (EOF) with nothing more to read.
  bool at_eof() {
    if (!pending_.empty()) return false;
    return !fill();
  }

 private:
  bool fill() {
    char buf[65536];
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n <= 0) return false;
    pending_.append(buf, static_cast<std::size_t>(n));
    return true;
  }
  int fd_;
  std::string pending_;
};

std::string post(std::string_view path, std::string_view body) {
  return "POST " + std::string(path) + " HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\n"
         "Content-Length: " + std::to_string(body.size()) +
         "\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\r\n" + std::string(body);
}
std::string get(std::string_view path) {
  return "GET " + std::string(path) + " HTTP/1.1\r\nHost: x\r\n\r\n";
}

HttpResponse roundtrip(int fd, Reader& reader, const std::string& request) {
  if (!send_text(fd, request)) return {};
  return reader.read_response();
}

// --- fixture ----------------------------------------------------------------------------------

core::Task<void> run_server(Server& server, bool* joined) { *joined = co_await server.run(); }

struct RunResult {
  bool joined = false;
  std::size_t open_after_client = 0;
  ServerStats stats;
};

core::Task<void> serve_while(driver::Driver& driver, Server& server,
                             std::function<void()>* client, bool settle, RunResult* out) {
  co_await driver.start();
  core::Scope scope;
  scope.spawn(run_server(server, &out->joined));
  co_await core::offload([client] { (*client)(); });
  // Connections the client closed go away as soon as the server sees the EOF.
  auto deadline = std::chrono::steady_clock::now() + 3s;
  while (settle && server.stats().open_connections != 0 &&
         std::chrono::steady_clock::now() < deadline)
    (void)co_await core::sleep(5ms);
  out->open_after_client = server.stats().open_connections;
  server.stop();
  (void)co_await scope.join();
  out->stats = server.stats();
  co_await driver.shutdown(std::chrono::seconds(2));
}

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerd-api-test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/api.sock";
    config_.socket_paths = {socket_};
    config_.slow_client_timeout = 300ms;
    config_.idle_timeout = 5s;
    config_.shutdown_grace = 200ms;
    config_.max_connections = 4000;
    config_.max_json_bytes = 64 * 1024;
    config_.event_liveness_interval = 100ms;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // Runs the server until `client` (on a worker thread) returns; checks that every connection
  // is gone afterwards when `settle`.
  RunResult run(std::function<void()> client, bool settle = true) {
    core::Loop loop;
    driver::DriverConfig dc;
    dc.default_home = dir_ + "/root";
    dc.run_dir = dir_ + "/run";
    driver::Driver driver(dc);
    Server server(driver, config_);
    server.listen();
    RunResult result;
    loop.block_on(serve_while(driver, server, &client, settle, &result));
    EXPECT_TRUE(result.joined);
    if (settle) {
      EXPECT_EQ(result.open_after_client, 0u) << "connections leaked";
    }
    EXPECT_FALSE(std::filesystem::exists(socket_)) << "socket file left behind";
    return result;
  }

  std::string dir_;
  std::string socket_;
  ServerConfig config_;
};

TEST_F(ServerTest, HealthAnswersJson) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    HttpResponse r = roundtrip(fd, reader, get("/v1/health"));
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.headers["content-type"], "application/json");
    json j = r.body_json();
    ASSERT_TRUE(j.is_object()) << r.body;
    EXPECT_EQ(j["status"], "ok");
    EXPECT_EQ(j["version"], LAYERD_VERSION);
    EXPECT_TRUE(j["uptime_seconds"].is_number());
    EXPECT_EQ(j["active_mounts"], 0);
    ::close(fd);
  });
}

TEST_F(ServerTest, SocketIsGroupAccessibleOnly) {
  run([&] {
    struct stat st {};
    ASSERT_EQ(::stat(socket_.c_str(), &st), 0);
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_mode & 0777, 0660u);
  });
}

TEST_F(ServerTest, KeepAliveCarriesManyRequests) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    for (int i = 0; i < 5; ++i) {
      HttpResponse r = roundtrip(fd, reader, get("/v1/health"));
      EXPECT_EQ(r.status, 200);
    }
    HttpResponse a = roundtrip(fd, reader, post("/Plugin.Activate", ""));
    EXPECT_EQ(a.status, 200);
    EXPECT_EQ(a.headers["content-type"], "application/vnd.docker.plugins.v1+json");
    EXPECT_EQ(a.body_json(), json::parse(R"({"Implements":["GraphDriver"]})"));
    ::close(fd);
  });
}

TEST_F(ServerTest, PipelinedRequestsAnswerInOrder) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    ASSERT_TRUE(send_text(fd, get("/v1/health") + post("/Plugin.Activate", "") +
                                  get("/nope") + post("/GraphDriver.Capabilities", "{}\n")));
    HttpResponse r1 = reader.read_response();
    HttpResponse r2 = reader.read_response();
    HttpResponse r3 = reader.read_response();
    HttpResponse r4 = reader.read_response();
    EXPECT_EQ(r1.status, 200);
    EXPECT_EQ(r1.body_json()["status"], "ok");
    EXPECT_EQ(r2.body_json()["Implements"][0], "GraphDriver");
    EXPECT_EQ(r3.status, 404);
    EXPECT_EQ(r4.body_json(),
              json::parse(R"({"Capabilities":{"ReproducesExactDiffs":false}})"));
    ::close(fd);
  });
}

TEST_F(ServerTest, PluginCallsAnswerDockerShapes) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    auto call = [&](const char* path, const std::string& body) {
      HttpResponse r = roundtrip(fd, reader, post(path, body));
      EXPECT_EQ(r.status, 200) << path;
      EXPECT_EQ(r.headers["content-type"], "application/vnd.docker.plugins.v1+json") << path;
      json j = r.body_json();
      EXPECT_TRUE(j.is_object()) << path << ": " << r.body;
      return j;
    };
    const std::string id = R"({"ID":"0123456789abcdef"})" "\n";
    // Removing what is not there succeeds, as with Docker's own driver.
    EXPECT_EQ(call("/GraphDriver.Remove", id)["Err"], "");
    for (const char* path : {"/GraphDriver.Put", "/GraphDriver.Get"}) {
      json j = call(path, id);
      ASSERT_TRUE(j.contains("Err")) << path;
      EXPECT_TRUE(j["Err"].is_string());
      // Nothing of that id exists: every one of these fails with a message.
      EXPECT_FALSE(j["Err"].get<std::string>().empty()) << path;
    }
    EXPECT_TRUE(call("/GraphDriver.Exists", id)["Exists"].is_boolean());
    json status = call("/GraphDriver.Status", "{}\n");
    EXPECT_TRUE(status["Status"].is_array()) << status.dump();
    json meta = call("/GraphDriver.GetMetadata", id);
    EXPECT_TRUE(meta.contains("Err"));
    json changes = call("/GraphDriver.Changes", R"({"ID":"a","Parent":"b"})");
    EXPECT_TRUE(changes.contains("Err"));
    json size = call("/GraphDriver.DiffSize", R"({"ID":"a","Parent":"b"})");
    EXPECT_TRUE(size.contains("Err"));
    // StorageOpt is refused: this driver has no per-layer storage options.
    json create = call("/GraphDriver.Create",
                       R"({"ID":"x1","Parent":"","StorageOpt":{"size":"10G"}})");
    ASSERT_TRUE(create["Err"].is_string());
    EXPECT_FALSE(create["Err"].get<std::string>().empty());
    ::close(fd);
  });
}

TEST_F(ServerTest, DiffFailureIsNotA200TarStream) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    HttpResponse r = roundtrip(fd, reader, post("/GraphDriver.Diff",
                                                R"({"ID":"missing","Parent":""})"));
    EXPECT_EQ(r.status, 500);
    EXPECT_FALSE(r.body_json()["Err"].get<std::string>().empty());
    // The connection is still usable.
    EXPECT_EQ(roundtrip(fd, reader, get("/v1/health")).status, 200);
    ::close(fd);
  });
}

TEST_F(ServerTest, ChunkedBodies) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    std::string req =
        "POST /GraphDriver.Exists HTTP/1.1\r\nHost: \r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\n{\"ID\"\r\n"
        "6\r\n:\"abc\"\r\n"
        "2\r\n}\n\r\n"
        "0\r\n\r\n";
    HttpResponse r = roundtrip(fd, reader, req);
    EXPECT_EQ(r.status, 200);
    EXPECT_TRUE(r.body_json()["Exists"].is_boolean()) << r.body;

    // ApplyDiff streams its chunked body; a body that is not a tar fails with Err, and what
    // the driver did not read is skipped so the connection stays usable.
    std::string apply =
        "POST /GraphDriver.ApplyDiff?id=abc&parent= HTTP/1.1\r\nHost: \r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
        "b\r\nnot a tar!!\r\n0\r\n\r\n";
    HttpResponse a = roundtrip(fd, reader, apply);
    EXPECT_EQ(a.status, 200);
    json aj = a.body_json();
    ASSERT_TRUE(aj["Err"].is_string()) << a.body;
    EXPECT_FALSE(aj["Err"].get<std::string>().empty());
    EXPECT_EQ(roundtrip(fd, reader, get("/v1/health")).status, 200);

    // A malformed chunk size: 400, then the server closes.
    std::string bad =
        "POST /GraphDriver.Exists HTTP/1.1\r\nHost: \r\nTransfer-Encoding: chunked\r\n\r\n"
        "zz\r\nxx\r\n0\r\n\r\n";
    HttpResponse b = roundtrip(fd, reader, bad);
    EXPECT_EQ(b.status, 400);
    EXPECT_TRUE(reader.at_eof());
    ::close(fd);
  });
}

// A plain ustar archive of regular files (enough for the body tests; the archive tests use
// libarchive's writer).
std::string ustar(const std::vector<std::pair<std::string, std::string>>& files) {
  std::string out;
  for (const auto& [name, data] : files) {
    char h[512] = {};
    std::snprintf(h, 100, "%s", name.c_str());
    std::snprintf(h + 100, 8, "%07o", 0644);
    std::snprintf(h + 108, 8, "%07o", 0);
    std::snprintf(h + 116, 8, "%07o", 0);
    std::snprintf(h + 124, 12, "%011llo", static_cast<unsigned long long>(data.size()));
    std::snprintf(h + 136, 12, "%011o", 1600000000);
    h[156] = '0';
    std::memcpy(h + 257, "ustar", 6);
    std::memcpy(h + 263, "00", 2);
    std::memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (unsigned char c : h) sum += c;
    std::snprintf(h + 148, 8, "%06o", sum);
    out.append(h, sizeof h);
    out += data;
    out.append((512 - data.size() % 512) % 512, '\0');
  }
  out.append(1024, '\0');
  return out;
}

// ApplyDiff bodies of several MiB, with a Content-Length and chunked in sizes from 1 byte to
// 300 KB: the layer holds every byte, in order (the body is read into the tar decoder's buffers
// megabytes at a time, partly straight from the parser; see Connection::read_body).
TEST_F(ServerTest, ApplyDiffBodiesArriveByteExact) {
  std::mt19937 rng(7);
  auto random_bytes = [&](std::size_t n) {
    std::string s(n, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    return s;
  };
  std::vector<std::pair<std::string, std::string>> files;
  files.emplace_back("big1", random_bytes(3 * 1024 * 1024 + 17));
  for (int i = 0; i < 50; ++i) files.emplace_back("small" + std::to_string(i), random_bytes(rng() % 5000));
  files.emplace_back("big2", random_bytes(5 * 1024 * 1024 - 3));
  const std::string tar = ustar(files);
  std::uint64_t total = 0;
  for (const auto& f : files) total += f.second.size();

  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    for (std::string id : {"plain", "chunked"}) {
      HttpResponse c = roundtrip(fd, reader, post("/GraphDriver.Create", R"({"ID":")" + id + R"(","Parent":""})"));
      ASSERT_EQ(c.body_json()["Err"], "") << c.body;
      std::string head = "POST /GraphDriver.ApplyDiff?id=" + id + "&parent= HTTP/1.1\r\nHost: \r\n";
      std::string request;
      if (id == "plain") {
        request = head + "Content-Length: " + std::to_string(tar.size()) + "\r\n\r\n" + tar;
      } else {
        request = head + "Transfer-Encoding: chunked\r\n\r\n";
        const std::size_t sizes[] = {1, 7, 4093, 65537, 300000, 512, 131072};
        for (std::size_t at = 0, k = 0; at < tar.size(); ++k) {
          std::size_t n = std::min(sizes[k % std::size(sizes)], tar.size() - at);
          char len[32];
          std::snprintf(len, sizeof len, "%zx\r\n", n);
          request += len + tar.substr(at, n) + "\r\n";
          at += n;
        }
        request += "0\r\n\r\n";
      }
      HttpResponse a = roundtrip(fd, reader, request);
      ASSERT_EQ(a.status, 200);
      json aj = a.body_json();
      EXPECT_EQ(aj["Err"], "") << a.body;
      EXPECT_EQ(aj["Size"], total) << a.body;
      for (const auto& [name, data] : files) {
        std::ifstream in(dir_ + "/root/" + id + "/diff/" + name, std::ios::binary);
        std::string got((std::istreambuf_iterator<char>(in)), {});
        EXPECT_TRUE(got == data) << id << ": " << name << " differs (" << got.size() << " of " << data.size() << " bytes)";
      }
    }
    // The connection is still in step: the next request is answered.
    EXPECT_EQ(roundtrip(fd, reader, get("/v1/health")).status, 200);
    ::close(fd);
  });
}

TEST_F(ServerTest, ExpectContinueGetsInterimAnswer) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    std::string body = R"({"ID":"abc"})";
    ASSERT_TRUE(send_text(fd, "POST /GraphDriver.Exists HTTP/1.1\r\nHost: \r\nExpect: "
                              "100-continue\r\nContent-Length: " +
                                  std::to_string(body.size()) + "\r\n\r\n"));
    char buf[128] = {};
    ssize_t n = ::recv(fd, buf, sizeof buf - 1, 0);
    ASSERT_GT(n, 0);
    EXPECT_EQ(std::string(buf, static_cast<std::size_t>(n)), "HTTP/1.1 100 Continue\r\n\r\n");
    ASSERT_TRUE(send_text(fd, body));
    Reader reader(fd);
    HttpResponse r = reader.read_response();
    EXPECT_EQ(r.status, 200);
    EXPECT_TRUE(r.body_json()["Exists"].is_boolean());
    ::close(fd);
  });
}

TEST_F(ServerTest, MalformedRequestIs400AndCloses) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    HttpResponse r = roundtrip(fd, reader, "GARBAGE\r\n\r\n");
    EXPECT_EQ(r.status, 400);
    EXPECT_TRUE(reader.at_eof());
    ::close(fd);
  });
}

TEST_F(ServerTest, OversizedHeadIs431) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    std::string req = "GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " +
                      std::string(20 * 1024, 'a') + "\r\n\r\n";
    HttpResponse r = roundtrip(fd, reader, req);
    EXPECT_EQ(r.status, 431);
    EXPECT_TRUE(reader.at_eof());
    ::close(fd);
  });
}

TEST_F(ServerTest, OversizedJsonIs413) {
  run([&] {
    {
      // Declared too large: refused before the body is read.
      int fd = connect_to(socket_);
      ASSERT_GE(fd, 0);
      Reader reader(fd);
      HttpResponse r = roundtrip(
          fd, reader,
          "POST /GraphDriver.Get HTTP/1.1\r\nHost: \r\nContent-Length: 1000000\r\n\r\n{");
      EXPECT_EQ(r.status, 413);
      EXPECT_TRUE(r.body_json()["Err"].is_string());
      EXPECT_TRUE(reader.at_eof());
      ::close(fd);
    }
    {
      // Chunked: refused when it grows past the limit.
      int fd = connect_to(socket_);
      ASSERT_GE(fd, 0);
      Reader reader(fd);
      std::string req = "POST /GraphDriver.Get HTTP/1.1\r\nHost: \r\nTransfer-Encoding: chunked\r\n\r\n";
      for (int i = 0; i < 20; ++i) req += "1000\r\n" + std::string(4096, ' ') + "\r\n";
      req += "0\r\n\r\n";
      (void)send_text(fd, req);  // the server may close before it has read everything
      HttpResponse r = reader.read_response();
      EXPECT_EQ(r.status, 413);
      ::close(fd);
    }
  });
}

TEST_F(ServerTest, MalformedJsonIs400AndKeepsTheConnection) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    HttpResponse r = roundtrip(fd, reader, post("/GraphDriver.Get", "{\"ID\": "));
    EXPECT_EQ(r.status, 400);
    EXPECT_TRUE(r.body_json()["Err"].is_string());
    HttpResponse t = roundtrip(fd, reader, post("/GraphDriver.Get", R"({"ID": 5})"));
    EXPECT_EQ(t.status, 400);
    EXPECT_EQ(roundtrip(fd, reader, get("/v1/health")).status, 200);
    ::close(fd);
  });
}

TEST_F(ServerTest, UnknownRouteAndWrongMethod) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    HttpResponse a = roundtrip(fd, reader, get("/v2/nothing"));
    EXPECT_EQ(a.status, 404);
    EXPECT_TRUE(a.body_json()["Err"].is_string());
    HttpResponse b = roundtrip(fd, reader, get("/GraphDriver.Get"));
    EXPECT_EQ(b.status, 405);
    HttpResponse c = roundtrip(fd, reader, post("/v1/health", "{}"));
    EXPECT_EQ(c.status, 405);
    HttpResponse d = roundtrip(fd, reader, post("/GraphDriver.Nope", "{}"));
    EXPECT_EQ(d.status, 404);
    EXPECT_EQ(roundtrip(fd, reader, get("/v1/health")).status, 200);
    ::close(fd);
  });
}

TEST_F(ServerTest, ClientsVanishingMidRequestLeakNothing) {
  run([&] {
    for (int i = 0; i < 20; ++i) {
      int fd = connect_to(socket_);
      ASSERT_GE(fd, 0);
      if (i % 2 == 0) {
        send_text(fd, "POST /GraphDriver.Get HTTP/1.1\r\nHost: \r\nContent-Length: 100\r\n\r\n{\"ID\"");
      } else {
        send_text(fd, "GET /v1/hea");
      }
      ::close(fd);
    }
  });
}

TEST_F(ServerTest, ThousandConcurrentConnections) {
  rlimit limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &limit), 0);
  if (limit.rlim_cur < 2200 && limit.rlim_max >= 2200) {
    limit.rlim_cur = limit.rlim_max;
    ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &limit), 0);
  }
  if (limit.rlim_cur < 2200) GTEST_SKIP() << "needs 2200 open files, the limit is " << limit.rlim_cur;
  constexpr int kClients = 1000;
  RunResult result = run([&] {
    std::vector<int> fds;
    for (int i = 0; i < kClients; ++i) {
      int fd = connect_to(socket_);
      ASSERT_GE(fd, 0) << "connection " << i;
      fds.push_back(fd);
    }
    for (int fd : fds) ASSERT_TRUE(send_text(fd, get("/v1/health")));
    int ok = 0;
    for (int fd : fds) {
      Reader reader(fd);
      if (reader.read_response().status == 200) ++ok;
    }
    EXPECT_EQ(ok, kClients);
    for (int fd : fds) ::close(fd);
  });
  EXPECT_GE(result.stats.accepted, static_cast<std::uint64_t>(kClients));
}

TEST_F(ServerTest, ConnectionsBeyondTheLimitGet503) {
  config_.max_connections = 2;
  run([&] {
    int a = connect_to(socket_);
    int b = connect_to(socket_);
    ASSERT_GE(a, 0);
    ASSERT_GE(b, 0);
    Reader ra(a), rb(b);
    EXPECT_EQ(roundtrip(a, ra, get("/v1/health")).status, 200);
    EXPECT_EQ(roundtrip(b, rb, get("/v1/health")).status, 200);
    int c = connect_to(socket_);
    ASSERT_GE(c, 0);
    Reader rc(c);
    HttpResponse r = rc.read_response();
    EXPECT_EQ(r.status, 503);
    EXPECT_TRUE(rc.at_eof());
    ::close(c);
    ::close(a);
    ::close(b);
  });
}

TEST_F(ServerTest, RefusedPeerGets403) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run a client as uid 65534";
  RunResult result = run([&] {
    // Let uid 65534 reach the socket file; the peer check must still refuse it.
    ASSERT_EQ(::chmod(dir_.c_str(), 0711), 0);
    ASSERT_EQ(::chmod(socket_.c_str(), 0666), 0);
    const std::string path = socket_;
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // Only raw system calls in the child of a threaded process.
      if (::setresgid(65534, 65534, 65534) != 0 || ::setresuid(65534, 65534, 65534) != 0)
        ::_exit(10);
      int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
      if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) ::_exit(11);
      static const char req[] = "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n";
      (void)::send(fd, req, sizeof req - 1, MSG_NOSIGNAL);
      char buf[64] = {};
      ssize_t n = ::recv(fd, buf, sizeof buf - 1, MSG_WAITALL);
      if (n < 12) ::_exit(12);
      ::_exit(std::memcmp(buf, "HTTP/1.1 403", 12) == 0 ? 0 : 13);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0);
  });
  EXPECT_EQ(result.stats.refused_peers, 1u);
}

TEST_F(ServerTest, SlowClientIsClosedAfterTheTimeout) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    auto start = std::chrono::steady_clock::now();
    ASSERT_TRUE(send_text(fd, "GET /v1/health HTTP/1.1\r\nHo"));
    Reader reader(fd);
    HttpResponse r = reader.read_response();
    EXPECT_EQ(r.status, 408);
    EXPECT_TRUE(reader.at_eof());
    auto elapsed = std::chrono::steady_clock::now() - start;
    EXPECT_GE(elapsed, 250ms);
    EXPECT_LT(elapsed, 3s);
    ::close(fd);
  });
}

TEST_F(ServerTest, IdleConnectionIsClosedAfterTheIdleTimeout) {
  config_.idle_timeout = 200ms;
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    EXPECT_EQ(roundtrip(fd, reader, get("/v1/health")).status, 200);
    auto start = std::chrono::steady_clock::now();
    EXPECT_TRUE(reader.at_eof());
    EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
    ::close(fd);
  });
}

TEST_F(ServerTest, StopEndsIdleConnectionsAndEventStreams) {
  int idle = -1;
  int events = -1;
  RunResult result = run(
      [&] {
        idle = connect_to(socket_);
        events = connect_to(socket_);
        ASSERT_GE(idle, 0);
        ASSERT_GE(events, 0);
        Reader r(idle);
        EXPECT_EQ(roundtrip(idle, r, get("/v1/health")).status, 200);
        ASSERT_TRUE(send_text(events, get("/v1/events")));
        Reader e(events);
        EXPECT_EQ(e.read_status_line(), 200);
      },
      /*settle=*/false);
  EXPECT_EQ(result.open_after_client, 2u);
  EXPECT_EQ(result.stats.open_connections, 0u);
  // Both were closed by the server.
  char byte;
  EXPECT_LE(::recv(idle, &byte, 1, 0), 0);
  ::close(idle);
  ::close(events);
}

TEST_F(ServerTest, EventStreamEndsWhenItsClientLeaves) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(send_text(fd, get("/v1/events")));
    Reader reader(fd);
    EXPECT_EQ(reader.read_status_line(), 200);
    ::close(fd);
  });
}

TEST_F(ServerTest, MetricsCountRequests) {
  run([&] {
    int fd = connect_to(socket_);
    ASSERT_GE(fd, 0);
    Reader reader(fd);
    EXPECT_EQ(roundtrip(fd, reader, get("/v1/health")).status, 200);
    EXPECT_EQ(roundtrip(fd, reader, get("/nope")).status, 404);
    HttpResponse m = roundtrip(fd, reader, get("/metrics"));
    EXPECT_EQ(m.status, 200);
    EXPECT_NE(m.body.find("layerd_http_requests_total{route=\"/v1/health\",status=\"200\"} 1"),
              std::string::npos)
        << m.body;
    EXPECT_NE(m.body.find("layerd_http_requests_total{route=\"unknown\",status=\"404\"} 1"),
              std::string::npos);
    for (const char* name :
         {"layerd_http_request_duration_seconds_bucket{le=\"+Inf\"} 2", "layerd_active_mounts 0",
          "layerd_http_connections_open 1", "layerd_mount_duration_seconds_count",
          "layerd_unmount_duration_seconds_count", "# TYPE layerd_child_exits_total counter"})
      EXPECT_NE(m.body.find(name), std::string::npos) << name;
    HttpResponse l = roundtrip(fd, reader, get("/v1/layers"));
    EXPECT_EQ(l.status, 200);
    EXPECT_TRUE(l.body_json()["layers"].is_array());
    ::close(fd);
  });
}

TEST_F(ServerTest, LiveSocketIsNotReplaced) {
  core::Loop loop;
  driver::DriverConfig dc;
  dc.default_home = dir_ + "/root";
  dc.run_dir = dir_ + "/run";
  driver::Driver driver(dc);
  Server first(driver, config_);
  first.listen();
  Server second(driver, config_);
  EXPECT_THROW(second.listen(), std::system_error);
  // A stale socket file (nobody listening) is replaced.
  Server third(driver, config_);
  std::filesystem::remove(socket_);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_.c_str(), sizeof addr.sun_path - 1);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ::close(fd);
  EXPECT_NO_THROW(third.listen());
}

}  // namespace
}  // namespace layerd::api
